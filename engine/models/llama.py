"""Llama-family decoder (Llama 2/3, Qwen2/2.5): RMSNorm, rotary, GQA attention, SwiGLU MLP.
Qwen2 is Llama with biases on q/k/v. Parameter names follow Hugging Face checkpoints, except that
q/k/v and gate/up are merged into one matmul each (see `packed_shards`)."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.linear import Linear, linear_method
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_settings
from kernels import activation


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, quant=None, prefix: str = ""):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = Linear(config.hidden_size, self.sizes, bias=qkv_bias,
                               method=linear_method(quant, f"{prefix}.qkv_proj", ("q_proj", "k_proj", "v_proj")))
        self.o_proj = Linear(q_size, [config.hidden_size], bias=o_bias,
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
    def __init__(self, config, quant=None, prefix: str = ""):
        super().__init__()
        inter = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = Linear(config.hidden_size, [inter, inter], bias=bias,
                                   method=linear_method(quant, f"{prefix}.gate_up_proj", ("gate_proj", "up_proj")))
        self.down_proj = Linear(inter, [config.hidden_size], bias=bias,
                                method=linear_method(quant, f"{prefix}.down_proj"))

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x, lora)
        act = activation.silu_and_mul if gate_up.is_cuda else activation.silu_and_mul_ref
        return self.down_proj(act(gate_up), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, o_bias: bool, quant=None, prefix: str = ""):
        super().__init__()
        self.self_attn = DecoderAttention(config, qkv_bias, o_bias, quant, f"{prefix}.self_attn")
        self.mlp = MLP(config, quant, f"{prefix}.mlp")
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
    def __init__(self, config, qkv_bias: bool, o_bias: bool, quant=None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, o_bias, quant, f"model.layers.{i}")
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta, lora=None):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta, lora)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    always_qkv_bias = False  # Qwen2 has q/k/v biases whatever the config says; Llama follows attention_bias
    # Checkpoint tensor name piece -> (our merged parameter piece, shard index).
    packed_shards = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config, quant_config=None):
        """`quant_config`: the checkpoint's QuantConfig (AWQ/GPTQ decoder linears; embeddings and the LM
        head stay dense, as those formats keep them), or None."""
        super().__init__()
        self.config = config
        attention_bias = bool(getattr(config, "attention_bias", False))
        self.model = DecoderModel(config, self.always_qkv_bias or attention_bias, attention_bias, quant_config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = Linear(config.hidden_size, [config.vocab_size], bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                lora=None) -> torch.Tensor:
        """Returns final hidden states [tokens, hidden]; logits come from compute_logits on the rows
        that are sampled, so that prefill chunks do not pay for the vocabulary projection. `lora`: the
        step's LoRAMapping (engine/lora/layers.py), passed down like the attention metadata."""
        return self.model(input_ids, positions, meta, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]


class Qwen2ForCausalLM(LlamaForCausalLM):
    always_qkv_bias = True


ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}
