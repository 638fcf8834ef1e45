"""`workbench models list|create|lora`: the presets (synthetic ones, and the real smollm2-135m), and random
PEFT LoRA adapters for them."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from engine.config import ConfigError
from engine.presets import PRESETS, cache_root, create_preset, estimate_params
from workbench.cli.console import console, fail, stdout

app = typer.Typer(help="Model presets: real shapes with random weights and a real tokenizer, and one real "
                  "model (smollm2-135m).", no_args_is_help=True)


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
    stdout.print(table)


@app.command("create")
def create(preset: str = typer.Argument(..., help="Preset name (see `workbench models list`)."),
           out: Path = typer.Option(..., "--out", help="Directory to write the model into."),
           seed: int = typer.Option(0, help="Seed of the random weights (synthetic presets)."),
           no_weights: bool = typer.Option(False, "--no-weights", help="Config and tokenizer only "
                                           "(for --load-format dummy)."),
           force: bool = typer.Option(False, help="Overwrite a non-empty --out.")) -> None:
    """Write a preset as a Hugging Face model directory."""
    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}", 2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        fail(f"{out} exists and is not empty; pass --force to overwrite")
    try:
        with console.status(f"writing {preset} ({_size(PRESETS[preset])}) to {out} ..."):
            create_preset(preset, out, seed=seed, with_weights=not no_weights, force=force)
    except ConfigError as exc:  # the real preset without its packages, say
        fail(str(exc), 2)  # fail() escapes markup: the message says [real]
    console.print(f"wrote {preset} to {out}")


SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj"}


@app.command("lora")
def lora(model: str = typer.Argument(..., help="Preset name or model directory (its config.json gives the shapes)."),
         rank: int = typer.Option(..., "--rank", help="LoRA rank r."),
         out: Path = typer.Option(..., "--out", help="Directory to write the adapter into."),
         targets: str = typer.Option("q,k,v,o,gate,up,down", help="Projections to adapt, comma-separated."),
         alpha: float = typer.Option(None, help="lora_alpha (default 2 x rank)."),
         rslora: bool = typer.Option(False, "--rslora", help="rsLoRA scaling (alpha / sqrt(r))."),
         seed: int = typer.Option(0, help="Seed of the random weights."),
         force: bool = typer.Option(False, help="Overwrite a non-empty --out.")) -> None:
    """Write a random, seeded PEFT LoRA adapter for a model (adapter_config.json + adapter_model.safetensors)."""
    from engine.lora.synthetic import write_adapter
    from engine.presets import resolve_model

    if rank < 1:
        fail(f"--rank must be at least 1, got {rank}", 2)
    names = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in names if t not in SHORT_TARGETS and t not in SHORT_TARGETS.values()]
    if bad or not names:
        fail(f"--targets: unknown projection(s) {', '.join(bad) or '(none)'}; choose from "
              f"{', '.join(SHORT_TARGETS)}", 2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        fail(f"{out} exists and is not empty; pass --force to overwrite")
    try:
        model_dir = resolve_model(model, with_weights=False)
    except FileNotFoundError as exc:
        fail(str(exc), 2)
    write_adapter(model_dir, out, rank, [SHORT_TARGETS.get(t, t) for t in names], alpha=alpha, seed=seed,
                  use_rslora=rslora, base_model_name=model)
    console.print(f"wrote a rank-{rank} LoRA adapter for {model} ({', '.join(names)}) to {out}")


@app.command("quantize")
def quantize(model: str = typer.Argument(..., help="Preset name (e.g. tiny, smollm2-135m) or a dense model directory."),
             method: str = typer.Option(..., "--method", help="awq (AutoAWQ GEMM) or gptq (GPTQ v1)."),
             out: Path = typer.Option(..., "--out", help="Directory to write the quantized model into."),
             bits: int = typer.Option(4, "--bits", help="4, or 8 (GPTQ only)."),
             group_size: int = typer.Option(128, "--group-size", help="Input rows per scale and zero point; -1: one "
                                            "group per column."),
             desc_act: bool = typer.Option(False, "--desc-act", help="GPTQ act-order (g_idx)."),
             sym: bool = typer.Option(True, "--sym/--no-sym", help="GPTQ: symmetric (no stored zero points) or not. "
                                      "AWQ is always asymmetric."),
             rtn: bool = typer.Option(False, "--rtn", help="Round to nearest instead of the calibrated algorithm "
                                      "(AWQ's scale search, GPTQ's Hessian updates)."),
             calib_text: Path = typer.Option(None, "--calib-text", help="Calibration text (default: bench quality's "
                                             "built-in text)."),
             seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration window."),
             max_samples: int = typer.Option(128, "--max-samples", help="Calibration windows at most."),
             force: bool = typer.Option(False, help="Overwrite a non-empty --out.")) -> None:
    """Write an AWQ or GPTQ checkpoint (safetensors + config.json quantization_config) of a dense model."""
    from engine.presets import resolve_model
    from workbench.quantize.writer import QuantizeSpec, quantize_model

    spec = QuantizeSpec(method, bits, group_size, desc_act, sym if method == "gptq" else True, not rtn, seq_len,
                        max_samples)
    if method == "awq" and not sym:
        fail("--no-sym is GPTQ's; AWQ always stores zero points", 2)
    try:
        spec.check()
    except ValueError as exc:
        fail(str(exc), 2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        fail(f"{out} exists and is not empty; pass --force to overwrite")
    try:
        src = resolve_model(model)
        quantize_model(src, out, spec, str(calib_text) if calib_text else None,
                       log=lambda m: console.print(escape(m), highlight=False))
    except (FileNotFoundError, ValueError, ConfigError) as exc:
        fail(str(exc), 2)
    console.print(f"wrote {model} quantized with {method} ({bits}-bit, group {group_size}"
                  f"{', act-order' if desc_act else ''}{', round to nearest' if rtn else ''}) to {out}")

