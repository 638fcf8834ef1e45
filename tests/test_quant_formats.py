"""AWQ and GPTQ tensors: packing against hand-worked words, round trips through each format and
the internal layout, the quantized matmul's reference, config detection and refusals by name."""
from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.quantization import formats
from engine.quantization.config import (
    QuantConfig,
    from_hf_config,
    normalize_option,
    resolve,
)
from engine.quantization.matmul import dequantize, quant_matmul
from engine.quantization.packing import (
    AWQ_ORDER,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)


def as_int32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word


# ---------------------------------------------------------------- hand-worked words
def test_gptq_qweight_packs_along_k_low_nibble_first():
    codes = torch.tensor([[1], [2], [3], [4], [5], [6], [7], [8]], dtype=torch.int32)  # k = 0..7, one column
    word = pack_rows(codes, 4)
    assert word.tolist() == [[as_int32(0x87654321)]]
    assert torch.equal(unpack_rows(word, 4), codes)


def test_8bit_packs_four_codes_a_word():
    codes = torch.tensor([[1], [2], [3], [255]], dtype=torch.int32)
    assert pack_rows(codes, 8).tolist() == [[as_int32(0xFF030201)]]
    assert pack_cols(codes.t(), 8).tolist() == [[as_int32(0xFF030201)]]


def test_awq_interleaves_the_eight_columns():
    # Column c holds code c: AutoAWQ puts column AWQ_ORDER[i] in nibble i -> nibbles 0,2,4,6,1,3,5,7.
    codes = torch.arange(8, dtype=torch.int32).view(1, 8)
    word = pack_cols(codes, 4, AWQ_ORDER)
    assert word.tolist() == [[0x75316420]]
    assert pack_cols(codes, 4).tolist() == [[as_int32(0x76543210)]]  # GPTQ's plain order, for contrast
    assert torch.equal(unpack_cols(word, 4, AWQ_ORDER), codes)


def test_gptq_zeros_are_stored_minus_one():
    w = formats.QuantWeights(q=torch.zeros(8, 8, dtype=torch.int32), zeros=torch.full((1, 8), 8, dtype=torch.int32),
                             scales=torch.ones(1, 8), bits=4, group_size=8)
    stored = formats.to_gptq(w)
    assert stored["qzeros"].tolist() == [[0x77777777]]
    assert stored["g_idx"].tolist() == [0] * 8
    assert formats.gptq_qzeros_to_internal(stored["qzeros"], 4).tolist() == [[as_int32(0x88888888)]]


def test_codes_out_of_range_are_refused():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_rows(torch.tensor([[16]] * 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="3 bits"):
        pack_rows(torch.zeros(8, 1, dtype=torch.int32), 3)


# ---------------------------------------------------------------- round trips
def random_weights(bits, k, n, group_size, g_idx=False, seed=0) -> formats.QuantWeights:
    gen = torch.Generator().manual_seed(seed)
    groups = formats.num_groups(k, group_size)
    q = torch.randint(0, 2 ** bits, (k, n), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 2 ** bits, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.01 + 1e-3).half().float()
    gi = None
    if g_idx:
        gi = formats.trivial_g_idx(k, group_size)[torch.randperm(k, generator=gen)]
    return formats.QuantWeights(q, zeros, scales, bits, group_size, gi)


@pytest.mark.parametrize("k,n,group_size", [(64, 24, 32), (96, 16, 64), (40, 8, 16)])
def test_awq_round_trip_and_internal(k, n, group_size):
    w = random_weights(4, k, n, group_size)
    stored = formats.to_awq(w)
    assert stored["qweight"].shape == (k, n // 8) and stored["qzeros"].shape == (w.zeros.shape[0], n // 8)
    back = formats.from_awq(stored, group_size)
    assert torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros) and torch.equal(back.scales.float(), w.scales)
    internal = formats.to_internal(w)
    assert torch.equal(formats.awq_qweight_to_internal(stored["qweight"]), internal["qweight"])
    assert torch.equal(formats.awq_qzeros_to_internal(stored["qzeros"]), internal["qzeros"])


@pytest.mark.parametrize("bits,k,n,group_size,act_order", [(4, 64, 16, 32, False), (4, 72, 8, 32, True),
                                                           (8, 48, 12, 16, False), (8, 64, 8, 16, True)])
def test_gptq_round_trip_and_internal(bits, k, n, group_size, act_order):
    w = random_weights(bits, k, n, group_size, g_idx=act_order)
    stored = formats.to_gptq(w)
    assert stored["qweight"].shape == (k * bits // 32, n)
    back = formats.from_gptq(stored, bits, group_size)
    assert torch.equal(back.q, w.q) and torch.equal(back.zeros, w.zeros)
    assert (back.g_idx is None) == (not act_order)
    assert torch.equal(stored["qweight"], formats.to_internal(w)["qweight"])  # GPTQ's qweight is ours
    assert torch.equal(formats.gptq_qzeros_to_internal(stored["qzeros"], bits), formats.to_internal(w)["qzeros"])


def test_gptq_writer_refuses_zero_point_zero():
    w = random_weights(4, 8, 8, 8)
    w.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        formats.to_gptq(w)


@pytest.mark.parametrize("g_idx", [False, True])
def test_quant_matmul_reference_is_the_formula(g_idx):
    w = random_weights(4, 80, 16, 32, g_idx=g_idx, seed=3)  # 80 = two full groups and a half one
    internal = formats.to_internal(w)
    g = w.group_index()
    expected_w = torch.stack([(w.q[k] - w.zeros[g[k]]).float() * w.scales[g[k]] for k in range(80)])
    got_w = dequantize(internal["qweight"], internal["scales"], internal["qzeros"], 4, 32, internal.get("g_idx"))
    assert torch.equal(got_w, expected_w)
    x = torch.randn(5, 80)
    y = quant_matmul(x, internal["qweight"], internal["scales"], internal["qzeros"], 4, 32, internal.get("g_idx"))
    torch.testing.assert_close(y, x @ expected_w)


# ---------------------------------------------------------------- config.json detection
class HF:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": False,
        "checkpoint_format": "gptq"}


def test_detects_awq_and_gptq():
    assert from_hf_config(HF(AWQ)) == QuantConfig("awq", 4, 128)
    assert from_hf_config(HF({**AWQ, "version": "GEMM", "modules_to_not_convert": ["down_proj"]})) == \
        QuantConfig("awq", 4, 128, modules_to_not_convert=("down_proj",))
    assert from_hf_config(HF(GPTQ)) == QuantConfig("gptq", 4, 128, desc_act=True, sym=False)
    assert from_hf_config(HF({**GPTQ, "bits": 8, "group_size": -1})).group_size == -1
    assert from_hf_config(HF()) is None


@pytest.mark.parametrize("qc,named", [
    ({**AWQ, "version": "gemv"}, "'gemv'"), ({**AWQ, "version": "gemv_fast"}, "'gemv_fast'"),
    ({**AWQ, "bits": 8}, "bits=8"), ({**AWQ, "zero_point": False}, "zero_point=false"),
    ({**GPTQ, "bits": 3}, "bits=3"), ({**GPTQ, "checkpoint_format": "gptq_v2"}, "'gptq_v2'"),
    ({**GPTQ, "checkpoint_format": "marlin"}, "'marlin'"), ({**GPTQ, "is_marlin_format": True}, "'marlin'"),
    ({**GPTQ, "format": "bitblas", "checkpoint_format": None}, "'none'"),
    ({**GPTQ, "dynamic": {"-:.*down": {}}}, "dynamic"), ({**GPTQ, "lm_head": True}, "lm_head"),
    ({"quant_method": "exl2"}, "'exl2'"), ({**GPTQ, "group_size": 0}, "group_size"),
])
def test_unsupported_variants_are_refused_by_name(qc, named):
    with pytest.raises(ConfigError, match=named):
        from_hf_config(HF(qc))


def test_option_aliases_and_mismatch():
    assert [normalize_option(o) for o in ("awq", "AWQ_MARLIN", "gptq", "gptq_marlin", None)] == \
        ["awq", "awq", "gptq", "gptq", None]
    with pytest.raises(ConfigError, match="quantization='fp8' is not supported"):
        normalize_option("fp8")
    assert resolve("awq_marlin", HF(AWQ)).method == "awq"
    with pytest.raises(ConfigError, match="does not match the checkpoint, which is quantized with 'gptq'"):
        resolve("awq", HF(GPTQ))
    with pytest.raises(ConfigError, match="no quantization_config"):
        resolve("gptq", HF())
