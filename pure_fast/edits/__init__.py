"""Edits: what an erasure changes, as a value object that can be applied, reverted, saved and loaded."""
