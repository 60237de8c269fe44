"""Core commands: `inspect`, `tokenizer train`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
