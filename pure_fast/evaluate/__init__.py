"""Evaluation: activation-level checks for any model, and the toy-world benchmark."""
