"""The one console of the commands (stderr: messages, progress; stdout: the tables a user may
redirect) and `fail()`: every command error is one line and a non-zero exit."""
from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, soft_wrap=True)  # soft_wrap: an error line is never wrapped mid-message
stdout = Console()


def fail(message: str, code: int = 1) -> NoReturn:
    """`error: MESSAGE` on stderr (markup in the message is shown as text), then exit `code`
    (2: bad input, 1: the run failed)."""
    console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
