"""Layer-by-layer calibration through transformers (the reference model class of our checkpoints):
the calibration text's hidden states enter decoder layer 0; each layer is quantized from the inputs
its linear layers see, then run again (quantized) to give the next layer its inputs, so that each
layer is calibrated on what the quantized model before it produces (sequential, as AutoAWQ and GPTQ do)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def calibration_ids(tokenizer, text: str, seq_len: int, max_samples: int) -> torch.Tensor:
    """[samples, seq_len] token ids: the text cut into consecutive windows."""
    ids = tokenizer.encode(text)
    n = min(max_samples, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


class LayerRunner:
    """Runs one decoder layer of a transformers Llama/Qwen2 model on calibration hidden states."""

    def __init__(self, model_dir: Path, ids: torch.Tensor):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
        inner = self.model.model
        self.hidden = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        self.position_embeddings = inner.rotary_emb(self.hidden, positions)
        self.layers = inner.layers

    def projections(self, i: int) -> dict[str, nn.Linear]:
        layer = self.layers[i]
        return {name: getattr(getattr(layer, parent), name) for name, parent in PROJECTIONS.items()}

    @torch.no_grad()
    def run(self, i: int) -> torch.Tensor:
        out = self.layers[i](self.hidden, attention_mask=None, position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def inputs(self, i: int, names: list[str]) -> dict[str, torch.Tensor]:
        """What each named projection of layer i receives, [tokens, in_features]."""
        seen = {}
        with _capture(self.projections(i), names, seen):
            self.run(i)
        return seen

    def advance(self, i: int) -> None:
        """Layer i is done: its output is the next layer's input."""
        self.hidden = self.run(i)


@contextmanager
def _capture(modules: dict[str, nn.Module], names: list[str], seen: dict):
    def hook(name):
        def record(_module, args):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return record

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
