"""Quantized checkpoints in the engine: what our quantizer writes is read back bit for bit, and the
engine's greedy output on a quantized `tiny` equals the engine on the same weights dequantized to a
plain float32 checkpoint, token for token (CPU, float32)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ConfigError
from engine.lora.synthetic import write_adapter
from engine.model_loader import build_model, load_hf_config
from engine.quantization import formats
from engine.quantization.config import from_hf_config
from tests.quant_helpers import (
    SPECS,
    dequantized_dir,
    layer_codes,
    quantized_dir,
    read_tensors,
)
from workbench.quantize.writer import LINEAR

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 99, 1000, 42, 7, 300]}, {"prompt_token_ids": list(range(200, 237))}]


def greedy(model: str, **kwargs) -> list[list[int]]:
    llm = LLM(model, max_num_batched_tokens=64, max_num_seqs=4, **kwargs)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("name", list(SPECS))
def test_checkpoint_reads_back_bit_for_bit(name):
    """The file's tensors decode to the codes, and the engine's internal tensors are exactly those codes."""
    qdir = quantized_dir(name)
    hf = load_hf_config(qdir)
    qc = from_hf_config(hf)
    assert (qc.method, qc.bits, qc.group_size, qc.desc_act) == (SPECS[name].method, SPECS[name].bits,
                                                              SPECS[name].group_size, SPECS[name].desc_act)
    tensors = read_tensors(qdir)
    model = build_model(hf, torch.float32, torch.device("cpu"), qdir, "auto", 0, qc)
    layer = model.model.layers[1].self_attn.qkv_proj
    start = 0
    for piece, size in zip(("q_proj", "k_proj", "v_proj"), layer.out_sizes):
        codes = layer_codes(tensors, f"model.layers.1.self_attn.{piece}", qc)
        internal = formats.to_internal(codes)
        p = 32 // qc.bits
        assert torch.equal(layer.qweight[:, start:start + size], internal["qweight"])
        assert torch.equal(layer.qzeros[:, start // p:(start + size) // p], internal["qzeros"])
        assert torch.equal(layer.scales[:, start:start + size], codes.scales.float())
        start += size
    if qc.desc_act:
        assert layer.g_idx is not None and not torch.equal(layer.g_idx, formats.trivial_g_idx(layer.in_features, 32))
    # Every decoder linear is quantized; the embeddings and the rest are as in the source.
    assert not any(LINEAR.match(n) for n in tensors)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", ["awq4-g32", "gptq4-g32-act", "gptq8-sym"])  # awq4-g128: the test below
def test_greedy_equals_dequantized_float32(name):
    assert greedy(str(quantized_dir(name))) == greedy(str(dequantized_dir(name)))


def test_greedy_awq_g128_and_lora_on_a_quantized_base(tmp_path):
    """The fast case of the comparison above, and LoRA's delta on top of a quantized base."""
    name = "awq4-g128"
    assert greedy(str(quantized_dir(name)), quantization="awq_marlin") == greedy(str(dequantized_dir(name)))
    adapter = write_adapter(dequantized_dir(name), tmp_path / "lora", 8, seed=3)
    from engine import LoRARequest

    def with_lora(model):
        llm = LLM(model, enable_lora=True, max_num_batched_tokens=64, max_num_seqs=4)
        outs = llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest("a", 1, str(adapter)), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    assert with_lora(str(quantized_dir(name))) == with_lora(str(dequantized_dir(name)))


def test_dummy_weights_and_option_errors(tmp_path):
    qdir = quantized_dir("gptq8-sym")
    assert len(greedy(str(qdir), load_format="dummy")[0]) == GREEDY.max_tokens
    with pytest.raises(ConfigError, match="quantization='awq' does not match the checkpoint, which is quantized "
                                          "with 'gptq'"):
        LLM(str(qdir), quantization="awq")
    with pytest.raises(ConfigError, match="quantization='int4' is not supported"):
        LLM(str(qdir), quantization="int4")
    bad = tmp_path / "gptq-v2"
    shutil.copytree(qdir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="checkpoint_format 'gptq_v2' is not supported"):
        LLM(str(bad))


def test_roofline_and_tune_precheck_count_packed_bytes():
    from workbench.bench.roofline import ModelShape
    from workbench.tune.precheck import estimate, model_quantization, model_spec

    qdir, ddir = quantized_dir("awq4-g128"), dequantized_dir("awq4-g128")
    quant, dense = (ModelShape.from_engine(LLM(str(d), load_format="dummy").llm_engine) for d in (qdir, ddir))
    assert quant.matmul_params == dense.matmul_params
    assert dense.weight_bytes == dense.matmul_params * 4
    # tiny (tied embeddings, 4,096 x 128 of them in float32) with 4-bit decoder linears
    linear = sum(m.in_features * sum(m.out_sizes) for m in LLM(str(qdir), load_format="dummy").llm_engine.runner
                 .model.modules() if hasattr(m, "qweight"))
    assert quant.weight_bytes < dense.weight_bytes - linear * 3
    qc = model_quantization(str(qdir))
    assert qc is not None and qc.method == "awq" and model_quantization(str(ddir)) is None
    est_q = estimate(model_spec(str(qdir)), {"dtype": "float32"}, False, qc)["weight_bytes"]
    est_d = estimate(model_spec(str(ddir)), {"dtype": "float32"}, False)["weight_bytes"]
    assert est_d == dense.weight_bytes and abs(est_q - quant.weight_bytes) < 0.05 * quant.weight_bytes
