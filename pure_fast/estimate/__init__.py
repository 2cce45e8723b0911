"""Estimation: orthonormal subspace bases per layer, batched over groups of equally shaped layers."""
