"""Kernels: each module holds one op's fast versions, its plain-torch reference and the dispatch."""
