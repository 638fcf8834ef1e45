"""`workbench models list|create`: the presets (synthetic ones, and the real smollm2-135m)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from engine.config import ConfigError
from engine.presets import PRESETS, cache_root, create_preset, estimate_params

app = typer.Typer(help="Model presets: real shapes with random weights and a real tokenizer, and one real "
                  "model (smollm2-135m).", no_args_is_help=True)
console = Console()


def _size(spec) -> str:
    nbytes = estimate_params(spec) * (4 if spec.dtype == "float32" else 2)
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


@app.command("list")
def list_presets() -> None:
    """List the presets and whether each is in the cache."""
    table = Table(title=f"Presets (cache: {cache_root()})")
    for col in ("name", "architecture", "weights", "params", "layers", "hidden", "heads / kv", "vocab", "dtype",
                "size", "cached"):
        table.add_column(col, justify="right" if col in ("params", "layers", "hidden", "vocab", "size") else "left")
    for spec in PRESETS.values():
        cached = (cache_root() / spec.name / "config.json").is_file()
        table.add_row(spec.name, spec.architecture, "real" if spec.is_real else "random",
                      f"{estimate_params(spec) / 1e6:,.1f}M",
                      str(spec.num_hidden_layers), str(spec.hidden_size),
                      f"{spec.num_attention_heads} / {spec.num_key_value_heads}", f"{spec.vocab_size:,}", spec.dtype,
                      _size(spec), "yes" if cached else "")
    console.print(table)


@app.command("create")
def create(preset: str = typer.Argument(..., help="Preset name (see `workbench models list`)."),
           out: Path = typer.Option(..., "--out", help="Directory to write the model into."),
           seed: int = typer.Option(0, help="Seed of the random weights (synthetic presets)."),
           no_weights: bool = typer.Option(False, "--no-weights", help="Config and tokenizer only "
                                           "(for --load-format dummy)."),
           force: bool = typer.Option(False, help="Overwrite a non-empty --out.")) -> None:
    """Write a preset as a Hugging Face model directory."""
    if preset not in PRESETS:
        console.print(f"[red]error:[/] unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        raise typer.Exit(2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        console.print(f"[red]error:[/] {out} exists and is not empty; pass --force to overwrite")
        raise typer.Exit(1)
    try:
        with console.status(f"writing {preset} ({_size(PRESETS[preset])}) to {out} ..."):
            create_preset(preset, out, seed=seed, with_weights=not no_weights, force=force)
    except ConfigError as exc:  # the real preset without its packages, say
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)  # escape: the message says [real]
        raise typer.Exit(2)
    console.print(f"wrote {preset} to {out}")
