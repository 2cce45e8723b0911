"""The toy world (renderer, captions), its text-to-image model (training, weights) and detectors."""
