"""Llama-family decoder (Llama 2/3, Qwen2/2.5): RMSNorm, rotary, GQA attention, SwiGLU MLP.
Qwen2 is Llama with biases on q/k/v. Parameter names follow Hugging Face checkpoints, except that
q/k/v and gate/up are merged into one matmul each (see `packed_shards`).

Parallelism (engine/distributed/): with tensor parallelism each rank holds its heads and its slice of
the MLP (engine/layers/parallel.py: one all-reduce after attention, one after the MLP); with pipeline
parallelism a stage holds a contiguous range of the layers (local indices from 0; `checkpoint_name`
maps the checkpoint's), the first stage the embedding, the last the final norm and the LM head. A
stage that is not the last returns its hidden states and residual for the next one."""
from __future__ import annotations

import torch
from torch import nn

from engine.distributed.stage import IntermediateTensors
from engine.distributed.state import SINGLE, ParallelRank
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.linear import linear_method
from engine.layers.norm import RMSNorm
from engine.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    qkv_parallel_linear,
)
from engine.layers.rotary import RotaryEmbedding, rope_settings
from kernels import activation


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def local_kv_heads(config, par: ParallelRank) -> int:
    """KV heads a tensor-parallel rank holds (one, replicated, when there are fewer heads than ranks)."""
    return max(1, num_kv_heads_of(config) // par.tp_size)


class DecoderAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, par: ParallelRank = SINGLE, quant=None,
                 prefix: str = ""):
        super().__init__()
        self.num_heads = config.num_attention_heads // par.tp_size
        self.num_kv_heads = local_kv_heads(config, par)
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = qkv_parallel_linear(config.hidden_size, config.num_attention_heads, num_kv_heads_of(config),
                                            self.head_dim, par, qkv_bias,
                                            linear_method(quant, f"{prefix}.qkv_proj", ("q_proj", "k_proj", "v_proj")))
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, par, o_bias,
                                        method=linear_method(quant, f"{prefix}.o_proj"))
        theta, scaling = rope_settings(config)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata, lora=None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x, lora).split(self.sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1), lora)


class MLP(nn.Module):
    def __init__(self, config, par: ParallelRank = SINGLE, quant=None, prefix: str = ""):
        super().__init__()
        inter = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [inter, inter], par, bias,
            method=linear_method(quant, f"{prefix}.gate_up_proj", ("gate_proj", "up_proj")))
        self.down_proj = RowParallelLinear(inter, config.hidden_size, par, bias,
                                           method=linear_method(quant, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)
        act = activation.silu_and_mul if gate_up.is_cuda else activation.silu_and_mul_ref
        return self.down_proj(act(gate_up), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, par: ParallelRank = SINGLE, quant=None,
                 prefix: str = ""):
        super().__init__()
        self.self_attn = DecoderAttention(config, qkv_bias, o_bias, par, quant, f"{prefix}.self_attn")
        self.mlp = MLP(config, par, quant, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta, lora=None):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, lora)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, lora), residual


class DecoderModel(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, par: ParallelRank = SINGLE, quant=None):
        super().__init__()
        self.par = par
        self.layer_range = par.layer_range(config.num_hidden_layers)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, par) \
            if par.is_first_stage else None
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, o_bias, par, quant, f"model.layers.{i}")
                                    for i in self.layer_range)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if par.is_last_stage else None

    def forward(self, input_ids, positions, meta, lora=None, intermediate: IntermediateTensors | None = None):
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate.hidden, intermediate.residual
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta, lora)
        if self.norm is None:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    always_qkv_bias = False  # Qwen2 has q/k/v biases whatever the config says; Llama follows attention_bias
    # Checkpoint tensor name piece -> (our merged parameter piece, shard index).
    packed_shards = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, par: ParallelRank = SINGLE, quant_config=None):
        """`par`: this rank's place in the tensor/pipeline grid; `quant_config`: the checkpoint's
        QuantConfig (AWQ/GPTQ decoder linears; embeddings and the LM head stay dense, as those formats
        keep them), or None."""
        super().__init__()
        self.config = config
        self.par = par
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.model = DecoderModel(config, self.always_qkv_bias or attention_bias, attention_bias, par, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, par) if par.is_last_stage else None
        if self.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora=None, intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        """Returns final hidden states [tokens, hidden]; logits come from compute_logits on the rows
        that are sampled, so that prefill chunks do not pay for the vocabulary projection. `lora`: the
        step's LoRAMapping (engine/lora/layers.py), passed down like the attention metadata. A later
        pipeline stage starts from the previous stage's `intermediate` tensors instead of input_ids."""
        return self.model(input_ids, positions, meta, lora, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def checkpoint_name(self, name: str) -> str | None:
        """This stage's name for a checkpoint tensor, or None when another stage holds it."""
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            local = int(index) - self.model.layer_range.start
            return f"model.layers.{local}.{rest}" if 0 <= local < len(self.model.layer_range) else None
        if name.startswith("model.embed_tokens."):
            if self.model.embed_tokens is not None:
                return name
            return "lm_head.weight" if self.tie_word_embeddings and self.lm_head is not None else None
        if name.startswith("model.norm.") or name.startswith("lm_head."):
            return name if self.lm_head is not None else None
        return name


class Qwen2ForCausalLM(LlamaForCausalLM):
    always_qkv_bias = True


ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}
