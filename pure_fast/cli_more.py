"""Further subcommands (export, combine, eval, ...), registered by the modules that implement them."""
from __future__ import annotations

MORE_COMMANDS: dict = {}


def add_more_commands(sub, add_model, add_common) -> None:
    """Hook for commands added by later stages; each registers itself in MORE_COMMANDS."""
    return None
