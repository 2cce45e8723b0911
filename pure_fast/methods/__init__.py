"""Erasure methods: each turns an erase context (model, concepts, anchors, options) into an Edit.

The registry is ``methods.base``; every method module defines ``METHOD = Method(...)``. The tuple below
registers them in the order the CLI and the benchmarks show them: a new method is one module plus its
entry there (and its import).
"""
from __future__ import annotations

from . import acterase, cure, pure, space, uce
from .base import EraseContext, Method, get_method, method_names, register, run_method

for _module in (pure, uce, cure, space, acterase):
    register(_module.METHOD)

__all__ = ["EraseContext", "Method", "get_method", "method_names", "register", "run_method"]
