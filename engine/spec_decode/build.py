"""The worker's SpecDecoder for an engine's SpeculativeConfig."""
from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.spec_decode.decoder import SpecDecoder
from engine.spec_decode.ngram import NgramProposer


def build_spec_decoder(config: EngineConfig, device: torch.device) -> SpecDecoder:
    spec = config.speculative
    if spec.method == "ngram":
        proposer = NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min)
    else:
        from engine.spec_decode.draft_model import DraftModelProposer

        proposer = DraftModelProposer(config, device)
    return SpecDecoder(proposer, spec.num_speculative_tokens, device)
