"""Erasure methods: each turns (model, forget, retain, options) into an Edit."""

METHODS = ("pure", "uce", "cure", "space", "acterase")
