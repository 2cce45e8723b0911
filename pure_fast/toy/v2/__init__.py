"""Toy world v2 (issue 13): the world, its detectors, the SD-shaped model and its training."""
