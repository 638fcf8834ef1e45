"""`workbench serve MODEL [vLLM flags]`: the same parser as `python -m engine.server`, passed through."""
from __future__ import annotations

import typer


def serve(ctx: typer.Context) -> None:
    """Start the OpenAI-compatible server (vLLM's flags; see `workbench serve --help`)."""
    from engine.server.__main__ import main

    raise typer.Exit(main(list(ctx.args), prog="workbench serve"))
