"""LoRA adapters: the PEFT reader (and every refusal), the CPU cache and GPU slots, and our model's
forward under a mixed-adapter mapping against transformers + PEFT."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, EngineConfig
from engine.lora import LoRAError, LoRARequest
from engine.lora.layers import lora_targets
from engine.lora.manager import LoRAManager, LoRASettings
from engine.lora.peft import load_adapter
from engine.lora.synthetic import write_adapter
from engine.model_loader import build_model, load_hf_config
from tests.engine_helpers import hf_model, model_dir
from tests.lora_helpers import adapter_dir, peft_model, prefill_logits


@pytest.fixture(scope="module")
def tiny_model():
    path = model_dir("tiny")
    return build_model(load_hf_config(path), torch.float32, torch.device("cpu"), path, "auto", 0)


def request(model: str, name: str, lora_id: int = 1) -> LoRARequest:
    return LoRARequest(name, lora_id, str(adapter_dir(model, name)))


# ---------------------------------------------------------------- the forward against PEFT
@pytest.mark.parametrize("model", ["tiny", "random-llama"])
def test_mixed_batch_logits_match_peft(model):
    """Three adapters (rank 8 on q/v, rank 16 everywhere, rsLoRA rank 4 on the MLP) and the base, in
    one forward pass: each prompt's logits equal transformers + PEFT's for its own adapter."""
    path = model_dir(model)
    ours = build_model(load_hf_config(path), torch.float32, torch.device("cpu"), path, "auto", 0)
    names = ["qv8", "all16", "mlp4rs", "k1"]
    manager = LoRAManager(ours, LoRASettings(max_loras=4, max_lora_rank=16, max_cpu_loras=4), torch.float32,
                          torch.device("cpu"))
    for i, n in enumerate(names):
        manager.add(request(model, n, i + 1))
    by_id = manager.activate(range(1, len(names) + 1))
    slots = {n: by_id[i + 1] for i, n in enumerate(names)}
    prompts = [[11 + 7 * i + j for j in range(5 + 9 * i)] for i in range(6)]
    under = ["qv8", None, "all16", "mlp4rs", "qv8", "k1"]
    logits = prefill_logits(ours, prompts, [slots[n] if n else -1 for n in under], num_slots=4)
    for prompt, name, got in zip(prompts, under, logits):
        ref_model = hf_model(model) if name is None else peft_model(model, name)
        with torch.no_grad():
            want = ref_model(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        if name is not None:
            with torch.no_grad():
                base = hf_model(model)(input_ids=torch.tensor([prompt])).logits[0]
            assert (got.argmax(-1) != base.argmax(-1)).any(), f"adapter {name} changes nothing"


def test_targets_map_peft_modules_onto_merged_layers(tiny_model):
    targets = lora_targets(tiny_model)
    assert len(targets) == 7 * 4
    k = targets["model.layers.2.self_attn.k_proj"]
    assert (k.layer, k.shard, k.in_features, k.out_features) == ("model.layers.2.self_attn.qkv_proj", 1, 128, 64)
    up = targets["model.layers.0.mlp.up_proj"]
    assert (up.layer, up.shard, up.out_features) == ("model.layers.0.mlp.gate_up_proj", 1, 352)
    assert "lm_head" not in " ".join(targets)


def test_scaling_and_rslora():
    cfg = json.loads((adapter_dir("tiny", "mlp4rs") / "adapter_config.json").read_text())
    model = load_adapter(request("tiny", "mlp4rs"), lora_targets(_tiny()), 16, torch.float32)
    assert model.scaling == pytest.approx(cfg["lora_alpha"] / 2.0)  # alpha / sqrt(4)
    plain = load_adapter(request("tiny", "qv8"), lora_targets(_tiny()), 16, torch.float32)
    assert plain.scaling == pytest.approx(16 / 8)  # default alpha = 2 r


def _tiny():
    path = model_dir("tiny")
    return build_model(load_hf_config(path), torch.float32, torch.device("cpu"), path, "auto", 0)


# ---------------------------------------------------------------- refusals
def broken_copy(tmp_path, edit_config=None, edit_tensors=None, name="all16"):
    out = tmp_path / "adapter"
    shutil.copytree(adapter_dir("tiny", name), out)
    if edit_config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit_config(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(str(out / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _drop_b(t):
    del t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]


def _nan(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")


def _dora(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(128)


def _bias(t):
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.ones(128)


def _embedding(t):
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(16, 4096)  # PEFT's names for them
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.ones(128, 16)


def _lm_head(t):
    t["base_model.model.lm_head.lora_A.weight"] = torch.ones(16, 128)
    t["base_model.model.lm_head.lora_B.weight"] = torch.ones(4096, 16)


def _saved_module(t):
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.ones(4096, 128)


def _layer_9(t):
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.ones(16, 128)
    t["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.ones(128, 16)


def _wrong_shape(t):
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    t[key] = torch.ones(16, 128)  # down_proj takes 352 features


@pytest.mark.parametrize("edit_config,edit_tensors,message", [
    (lambda c: c.update(r=32), None, "rank r=32 exceeds max_lora_rank"),
    (lambda c: c.update(use_dora=True), None, "DoRA"),
    (lambda c: c.update(bias="lora_only"), None, "bias='lora_only'"),
    (lambda c: c.update(modules_to_save=["lm_head"]), None, "modules_to_save"),
    (lambda c: c.update(target_modules=["q_proj", "embed_tokens"]), None, "embed_tokens"),
    (lambda c: c.update(rank_pattern={"q_proj": 4}), None, "rank_pattern"),
    (lambda c: c.update(peft_type="IA3"), None, "IA3"),
    (lambda c: c.update(r=8), None, r"not of the rank r=8"),  # the tensors are rank 16
    (None, _drop_b, "up_proj has no lora_B"),
    (None, _nan, "NaN"),
    (None, _dora, "DoRA"),
    (None, _bias, "LoRA biases"),
    (None, _embedding, "embedding adapters"),
    (None, _lm_head, "'lm_head'"),
    (None, _saved_module, "not a LoRA A/B weight"),
    (None, _layer_9, "does not exist in the base model"),
    (None, _wrong_shape, r"down_proj has lora_A \(16, 128\)"),
])
def test_malformed_adapters_are_refused_by_name(tmp_path, tiny_model, edit_config, edit_tensors, message):
    path = broken_copy(tmp_path, edit_config, edit_tensors)
    with pytest.raises(LoRAError, match=message):
        load_adapter(LoRARequest("broken", 1, str(path)), lora_targets(tiny_model), 16, torch.float32)


def test_missing_files_are_refused(tmp_path, tiny_model):
    targets = lora_targets(tiny_model)
    with pytest.raises(LoRAError, match="is not a directory"):
        load_adapter(LoRARequest("x", 1, str(tmp_path / "nope")), targets, 16, torch.float32)
    with pytest.raises(LoRAError, match="no adapter_config.json"):
        load_adapter(LoRARequest("x", 1, str(tmp_path)), targets, 16, torch.float32)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAError, match="not valid JSON"):
        load_adapter(LoRARequest("x", 1, str(tmp_path)), targets, 16, torch.float32)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(LoRAError, match="no adapter_model.safetensors.*adapter_model.bin"):
        load_adapter(LoRARequest("x", 1, str(tmp_path)), targets, 16, torch.float32)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoRAError, match="cannot read"):
        load_adapter(LoRARequest("x", 1, str(tmp_path)), targets, 16, torch.float32)


def test_adapter_for_another_model_is_refused(tiny_model):
    with pytest.raises(LoRAError, match="needs"):  # tiny-llama's projections are 192 wide, tiny's 128
        load_adapter(LoRARequest("llama", 1, str(adapter_dir("random-llama", "qv8"))), lora_targets(tiny_model), 16,
                     torch.float32)


def test_lora_request_fields():
    r = LoRARequest("sql", 3, "/adapters/sql")
    assert (r.lora_name, r.lora_int_id, r.lora_path, r.base_model_name) == ("sql", 3, "/adapters/sql", None)
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("sql", 0, "/x")


# ---------------------------------------------------------------- CPU cache and GPU slots
def test_slots_lru_pinning_and_cpu_cache(tiny_model):
    manager = LoRAManager(tiny_model, LoRASettings(max_loras=2, max_lora_rank=16, max_cpu_loras=2), torch.float32,
                          torch.device("cpu"))
    for i, name in enumerate(["qv8", "all16", "k1"]):
        manager.add(request("tiny", name, i + 1))
    assert list(manager.cpu) == [2, 3]  # the CPU cache holds 2: the first was evicted
    step = manager.activate([1, 2])  # ... and is read again from its path
    assert sorted(step.values()) == [0, 1] and manager.pins == [1, 1]
    with pytest.raises(RuntimeError, match="3 adapters in one step, but only 2 LoRA slots"):
        manager.activate([1, 2, 3])  # the scheduler must never let this happen
    step2 = manager.activate([2, 3])  # 1 is unpinned now: 3 takes its slot, 2 keeps its own
    assert step2[2] == step[2] and step2[3] == step[1] and 1 not in manager.slot_of
    qkv = manager.layers["model.layers.0.self_attn.qkv_proj"]
    slot = manager.activate([1, 3])[1]  # 1 comes back into 2's slot (unpinned, least recently used)
    assert slot == step[2] and manager.slot_of == {1: slot, 3: step[1]}
    assert qkv.a[slot, 8:16].abs().sum() == 0 and qkv.a[slot, :8].abs().sum() > 0  # rank 8, zero-padded
    assert qkv.a[slot, 16:32].abs().sum() == 0  # qv8 does not adapt k_proj
    assert manager.activate([]) == {} and manager.pins == [0, 0]
    assert manager.slot_of == {1: slot, 3: step[1]}  # unpinned slots keep their adapters for reuse
    with pytest.raises(LoRAError, match="never added"):
        manager.activate([9])


def test_remove_while_in_use_frees_the_slot_once_unused(tiny_model):
    manager = LoRAManager(tiny_model, LoRASettings(max_loras=1, max_lora_rank=16, max_cpu_loras=1), torch.float32,
                          torch.device("cpu"))
    manager.add(request("tiny", "qv8", 1))
    slot = manager.activate([1])[1]
    manager.remove(1)
    assert manager.slot_of == {1: slot}  # still serving this step
    assert manager.activate([1]) == {1: slot}  # and a request already queued under it
    manager.activate([])
    assert manager.slot_of == {} and manager.slot_ids == [None]


def test_one_id_is_one_adapter(tiny_model):
    manager = LoRAManager(tiny_model, LoRASettings(max_loras=1, max_lora_rank=16, max_cpu_loras=1), torch.float32,
                          torch.device("cpu"))
    manager.add(request("tiny", "qv8", 1))
    with pytest.raises(LoRAError, match="lora_int_id 1 is already adapter 'qv8'"):
        manager.add(request("tiny", "all16", 1))


def test_lora_settings_are_validated_by_name():
    assert EngineConfig("tiny", max_loras=4).max_cpu_loras == 4
    with pytest.raises(ConfigError, match="max_loras"):
        EngineConfig("tiny", max_loras=0)
    with pytest.raises(ConfigError, match="max_lora_rank"):
        EngineConfig("tiny", max_lora_rank=1000)
    with pytest.raises(ConfigError, match=r"max_cpu_loras \(2\) must be at least max_loras \(4\)"):
        EngineConfig("tiny", max_loras=4, max_cpu_loras=2)


def test_synthetic_adapter_is_peft_format(tmp_path):
    out = write_adapter(model_dir("tiny"), tmp_path / "a", rank=4, targets=["q_proj", "down_proj"], alpha=8, seed=3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (4, 8.0, ["q_proj", "down_proj"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 4 * 2 * 2
    assert tensors["base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"].shape == (4, 352)
    again = write_adapter(model_dir("tiny"), tmp_path / "b", rank=4, targets=["q_proj", "down_proj"], alpha=8, seed=3)
    assert torch.equal(load_file(str(again / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])  # seeded
    with pytest.raises(ValueError, match="lm_head"):
        write_adapter(model_dir("tiny"), tmp_path / "c", rank=4, targets=["lm_head"])
