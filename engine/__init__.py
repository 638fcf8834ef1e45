"""The PagedBench inference engine: vLLM's Python API over a paged-KV, continuously batching engine."""
from engine.config import ConfigError, EngineConfig
from engine.lora.request import LoRARequest
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.version import __version__


def __getattr__(name: str):
    # LLM pulls in torch models and transformers; import it lazily so that light users
    # (the server's argument parser, the CLI) start fast.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["__version__", "LLM", "SamplingParams", "EngineConfig", "ConfigError", "RequestOutput", "CompletionOutput",
           "Logprob", "LoRARequest"]
