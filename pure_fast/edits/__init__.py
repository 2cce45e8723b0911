"""Edits: what an erasure changes, as a value object that can be applied, reverted, saved and loaded.

Every edit kind registers itself on import (``io.KINDS``); importing the package imports them all, so
``io.load_edit`` knows every kind whatever module was imported first.
"""
from . import edit, patch, shared, sparse  # noqa: F401
