"""SpeculativeConfig: vLLM's `speculative_config` dict (or its older flags), checked once.

Accepted forms, as vLLM takes them:
  speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
  speculative_config={"method": "draft_model", "model": "tiny", "num_speculative_tokens": 4}
  speculative_model="[ngram]" (or a model), num_speculative_tokens=4, ngram_prompt_lookup_max/min=...
A "model" without a "method" means draft_model ("[ngram]" or "ngram" means ngram), as in vLLM.
num_speculative_tokens=0 turns speculation off (so that a tuner can search 0..k).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model")
NGRAM_NAMES = ("[ngram]", "ngram")
MAX_SPECULATIVE_TOKENS = 16  # the verification step's logits grow with k; past this, acceptance is ~0 anyway


class SpecConfigError(ValueError):
    """Raised as engine.config.ConfigError by EngineConfig (this module must not import it)."""


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft model (a preset name or a directory); draft_model only
    prompt_lookup_max: int = 4  # ngram: the longest suffix looked up
    prompt_lookup_min: int = 2  # ngram: the shortest

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpecConfigError(f"speculative_config: method must be one of {', '.join(METHODS)}; "
                                  f"got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise SpecConfigError(f"speculative_config: num_speculative_tokens must be an integer in "
                                  f"[1, {MAX_SPECULATIVE_TOKENS}] (0 turns speculation off); got {k!r}")
        if self.method == "draft_model" and not self.model:
            raise SpecConfigError("speculative_config: method 'draft_model' needs model (a preset name or a "
                                  "model directory)")
        if self.method == "ngram":
            if self.model is not None and self.model not in NGRAM_NAMES:
                raise SpecConfigError(f"speculative_config: method 'ngram' takes no model; got {self.model!r}")
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise SpecConfigError(f"speculative_config: {name} must be a positive integer; got {v!r}")
            if lo > hi:
                raise SpecConfigError(f"speculative_config: prompt_lookup_min ({lo}) must be <= "
                                      f"prompt_lookup_max ({hi})")


def build_speculative_config(spec: dict | str | None, speculative_model: str | None,
                             num_speculative_tokens: int | None, lookup_max: int | None,
                             lookup_min: int | None) -> SpeculativeConfig | None:
    """The one SpeculativeConfig (None: off) from the dict form or the older flags (not both)."""
    legacy = {"speculative_model": speculative_model, "num_speculative_tokens": num_speculative_tokens,
              "ngram_prompt_lookup_max": lookup_max, "ngram_prompt_lookup_min": lookup_min}
    given = [name for name, v in legacy.items() if v is not None]
    if spec is not None:
        if given:
            raise SpecConfigError(f"give speculative_config or the older flags ({', '.join(given)}), not both")
        if isinstance(spec, str):
            spec = parse_json(spec)
        if not isinstance(spec, dict):
            raise SpecConfigError(f"speculative_config must be a dict (JSON object); got {type(spec).__name__}")
        values = dict(spec)
    elif not given:
        return None
    else:
        values = {"model": speculative_model, "num_speculative_tokens": num_speculative_tokens,
                  "prompt_lookup_max": lookup_max, "prompt_lookup_min": lookup_min}
        values = {k: v for k, v in values.items() if v is not None}
    unknown = sorted(set(values) - set(SpeculativeConfig.keys()))
    if unknown:
        raise SpecConfigError(f"speculative_config: unknown key {unknown[0]!r}; known keys: "
                              f"{', '.join(SpeculativeConfig.keys())}")
    if values.get("num_speculative_tokens") == 0:
        return None
    if "num_speculative_tokens" not in values:
        raise SpecConfigError("speculative_config: num_speculative_tokens is required")
    if "method" not in values:
        model = values.get("model")
        if model is None:
            raise SpecConfigError("speculative_config: give method (ngram or draft_model) or model")
        values["method"] = "ngram" if model in NGRAM_NAMES else "draft_model"
    if values["method"] == "ngram" and values.get("model") in NGRAM_NAMES:
        del values["model"]
    elif values["method"] != "ngram" and any(k in values for k in ("prompt_lookup_max", "prompt_lookup_min")):
        key = "prompt_lookup_max" if "prompt_lookup_max" in values else "prompt_lookup_min"
        raise SpecConfigError(f"speculative_config: {key} is an ngram setting; method is {values['method']!r}")
    return SpeculativeConfig(**values)


def parse_json(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecConfigError(f"speculative_config is not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(value, dict):
        raise SpecConfigError(f"speculative_config must be a JSON object; got {text!r}")
    return value
