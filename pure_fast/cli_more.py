"""Further subcommands (export, combine, eval, bench-quality, ...), one module per area.

Each module in ``AREAS`` (``pure_fast/cli_<area>.py``) defines ``add_commands(sub, add_model, add_common)``,
which adds its subparsers, and ``COMMANDS``: subcommand name -> handler(args) -> exit code.
"""
from __future__ import annotations

import importlib

AREAS = ("cli_eval", "cli_export", "cli_methods", "cli_safety")

MORE_COMMANDS: dict = {}


def _area_modules():
    for name in AREAS:
        try:
            yield importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise


def add_more_commands(sub, add_model, add_common) -> None:
    for mod in _area_modules():
        mod.add_commands(sub, add_model, add_common)
        MORE_COMMANDS.update(mod.COMMANDS)
