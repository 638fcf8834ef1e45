"""vLLM flags this engine does not build, refused by name.

A vLLM command line carried over should fail on the first flag we cannot honour with one line that
names it and says what it does, not with argparse's "unrecognized arguments" (which lists them all
and explains nothing), and never by silently ignoring it. A flag given at the value that means "off"
(`--kv-cache-dtype auto`, `--cpu-offload-gb 0`) asks for nothing we lack, so it is accepted.

Tensor/pipeline parallelism, speculative decoding and quantization flags are not here: they belong
to those capabilities (engine/config.py NOT_YET_SUPPORTED until they land)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Unsupported:
    flags: tuple[str, ...]  # the spelling first, then aliases
    what: str  # what the flag does in vLLM, for the error
    accept: tuple[str, ...] = ()  # values that ask for nothing we lack (none: refused with any value)
    switch: bool = False  # takes no value (store_true in vLLM): refused whenever given


def _u(flags: str, what: str, accept: str = "", switch: bool = False) -> Unsupported:
    """`flags` and `accept`: space-separated."""
    return Unsupported(tuple(flags.split()), what, tuple(accept.split()), switch)


ENGINE = [
    _u("--kv-cache-dtype", "stores the KV cache in another data type such as fp8", accept="auto"),
    _u("--calculate-kv-scales", "computes fp8 KV-cache scales", switch=True),
    _u("--cpu-offload-gb", "keeps part of the weights in CPU memory", accept="0"),
    _u("--swap-space", "CPU swap space for preempted sequences; this engine recomputes them instead", accept="0"),
    _u("--preemption-mode", "swaps preempted sequences to CPU; this engine recomputes them", accept="recompute"),
    _u("--enable-expert-parallel", "expert parallelism for mixture-of-experts models", switch=True),
    _u("--data-parallel-size -dp", "data parallelism: several engine replicas behind one server", accept="1"),
    _u("--data-parallel-size-local -dpl", "data-parallel replicas on this node", accept="1"),
    _u("--data-parallel-address -dpa", "the data-parallel group's address"),
    _u("--data-parallel-rpc-port -dpp", "the data-parallel group's RPC port"),
    _u("--headless", "runs engines without an API server (data parallelism)", switch=True),
    _u("--guided-decoding-backend", "structured output: JSON schema, regex, grammar"),
    _u("--enable-sleep-mode", "frees device memory while the engine sleeps", switch=True),
    _u("--kv-transfer-config", "sends KV caches between instances (disaggregated prefill)"),
    _u("--kv-events-config", "publishes KV-cache events"),
    _u("--download-dir", "where models are downloaded; this engine never downloads"),
    _u("--revision", "a Hugging Face revision; the local Hugging Face cache is read at its default revision"),
    _u("--code-revision", "the revision of a model's remote code; no remote code runs here"),
    _u("--tokenizer-revision", "a Hugging Face revision of the tokenizer"),
    _u("--tokenizer-mode", "a slow or Mistral tokenizer instead of the fast Hugging Face one", accept="auto"),
    _u("--skip-tokenizer-init", "starts without a tokenizer", switch=True),
    _u("--config-format", "reads a model config in Mistral's format", accept="auto hf"),
    _u("--hf-config-path", "reads the model config from another path"),
    _u("--hf-overrides", "overrides fields of the model config"),
    _u("--rope-scaling", "overrides the model's RoPE scaling"),
    _u("--rope-theta", "overrides the model's RoPE theta"),
    _u("--model-impl", "runs the model through another implementation (transformers)", accept="auto vllm"),
    _u("--model-loader-extra-config", "extra settings for a custom model loader"),
    _u("--ignore-patterns", "weight files to skip while downloading"),
    _u("--max-parallel-loading-workers", "loads the weights in several worker batches"),
    _u("--compilation-config -O", "torch.compile settings"),
    _u("--scheduling-policy", "priority scheduling", accept="fcfs"),
    _u("--scheduler-cls", "a custom scheduler class"),
    _u("--worker-cls", "a custom worker class"),
    _u("--worker-extension-cls", "extends the worker with a custom class"),
    _u("--num-scheduler-steps", "multi-step scheduling", accept="1"),
    _u("--max-num-partial-prefills", "several prompts prefilled in parts at once", accept="1"),
    _u("--max-long-partial-prefills", "several long prompts prefilled in parts at once", accept="1"),
    _u("--long-prefill-token-threshold", "a separate budget for long prompts", accept="0"),
    _u("--disable-async-output-proc", "turns off overlapping output processing with the next step", switch=True),
    _u("--enable-prompt-embeds", "prompts given as embeddings", switch=True),
    _u("--enable-prompt-adapter", "prompt-tuning adapters", switch=True),
    _u("--max-prompt-adapters", "prompt-tuning adapters"),
    _u("--enable-lora-bias", "LoRA adapters with bias terms", switch=True),
    _u("--lora-extra-vocab-size", "LoRA adapters that extend the vocabulary"),
    _u("--lora-dtype", "LoRA weights in a data type other than the model's", accept="auto"),
    _u("--long-lora-scaling-factors", "long-context LoRA"),
    _u("--limit-mm-per-prompt", "images, audio or video in prompts (multimodal)"),
    _u("--mm-processor-kwargs", "multimodal input processing"),
    _u("--disable-mm-preprocessor-cache", "multimodal input processing", switch=True),
    _u("--allowed-local-media-path", "images or video read from local files (multimodal)"),
    _u("--generation-config", "sampling defaults from the model's generation_config.json; here a request's "
       "defaults are vLLM's own", accept="vllm"),
    _u("--override-generation-config", "overrides the model's generation defaults"),
    _u("--override-pooler-config", "pooling models (embeddings, rewards)"),
    _u("--task", "pooling tasks (embeddings, classification, rewards)", accept="auto generate"),
    _u("--reasoning-parser", "splits reasoning from the answer"),
    _u("--enable-reasoning", "splits reasoning from the answer", switch=True),
    _u("--otlp-traces-endpoint", "OpenTelemetry tracing"),
    _u("--collect-detailed-traces", "OpenTelemetry tracing"),
]

SERVER = [
    _u("--uds", "serves on a Unix domain socket"),
    _u("--root-path", "serves behind a path-prefixing proxy"),
    _u("--middleware", "adds ASGI middleware"),
    _u("--allowed-origins", "CORS"),
    _u("--allowed-methods", "CORS"),
    _u("--allowed-headers", "CORS"),
    _u("--allow-credentials", "CORS", switch=True),
    _u("--ssl-keyfile", "HTTPS"),
    _u("--ssl-certfile", "HTTPS"),
    _u("--ssl-ca-certs", "HTTPS"),
    _u("--ssl-cert-reqs", "HTTPS"),
    _u("--enable-ssl-refresh", "HTTPS", switch=True),
    _u("--chat-template", "a chat template file that replaces the model's own"),
    _u("--chat-template-content-format", "message content passed to the template as OpenAI parts",
       accept="auto string"),
    _u("--response-role", "the role name of generated chat messages", accept="assistant"),
    _u("--enable-auto-tool-choice", "tool calling", switch=True),
    _u("--tool-call-parser", "tool calling"),
    _u("--tool-parser-plugin", "tool calling"),
    _u("--return-tokens-as-token-ids", "logprob tokens as token ids", switch=True),
    _u("--disable-frontend-multiprocessing", "runs the engine in the API server's process; here it always has "
       "its own", switch=True),
    _u("--enable-request-id-headers", "X-Request-Id response headers", switch=True),
    _u("--enable-server-load-tracking", "the /load endpoint", switch=True),
    _u("--enable-force-include-usage", "usage in every response", switch=True),
    _u("--disable-fastapi-docs", "turns off the OpenAPI docs routes", switch=True),
    _u("--prompt-adapters", "prompt-tuning adapters"),
    _u("--log-config-file", "a logging configuration file"),
]


class Refuse(argparse.Action):
    def __init__(self, option_strings, dest, flag: Unsupported, **kwargs):
        self.flag = flag
        super().__init__(option_strings, dest, nargs=0 if flag.switch else None, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        flag = self.flag
        if not flag.switch and any(_same(values, ok) for ok in flag.accept):
            return
        given = flag.flags[0] if flag.switch else f"{flag.flags[0]} {values}"
        hint = f"; leave it at {flag.accept[0]}" if flag.accept else ""
        parser.exit(2, f"{parser.prog}: error: {given} is not supported by this engine ({flag.what}){hint}\n")


def _same(value: str, accept: str) -> bool:
    try:
        return float(value) == float(accept)
    except ValueError:
        return value.strip().lower() == accept


def add_unsupported(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flags: list[Unsupported]) -> None:
    """Register the flags: hidden from --help, never in the parsed namespace."""
    for flag in flags:
        parser.add_argument(*flag.flags, action=Refuse, flag=flag)
