"""Hugging Face ids: the local Hugging Face cache first (never a download), else with load_format='dummy'
the preset of the same shapes, else one line that lists the presets."""
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.presets import PRESETS, preset_for_hf_id, resolve_model

SHA = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo_id: str, model_dir: Path, ref: str | None = "main") -> Path:
    """huggingface_hub's layout: blobs by content hash, snapshots/<sha>/<file> linking to them, refs/<ref>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / SHA
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(SHA)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_presets_name_the_hub_ids_of_their_shapes():
    assert preset_for_hf_id("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b"
    assert preset_for_hf_id("Qwen/Qwen2.5-0.5B-Instruct").name == "qwen2.5-0.5b"
    assert preset_for_hf_id("meta-llama/Llama-3.1-8B").name == "llama-3.1-8b"
    assert preset_for_hf_id("HuggingFaceTB/SmolLM2-135M-Instruct").name == "smollm2-135m"
    assert preset_for_hf_id("qwen/qwen2.5-7b-instruct").name == "qwen2.5-7b"  # the Hub ignores case
    assert preset_for_hf_id("someone/else") is None
    ids = [i.lower() for p in PRESETS.values() for i in p.hf_ids]
    assert len(ids) == len(set(ids)), "an id names two presets"
    llama31 = PRESETS["llama-3.1-8b"]
    assert llama31.max_position_embeddings == 131072 and llama31.rope_scaling["rope_type"] == "llama3"


def test_a_cached_model_is_served_from_the_hub_cache(hub, caplog):
    snapshot = write_hub_cache(hub, "SomeOrg/Tiny-Chat", resolve_model("tiny"))
    with caplog.at_level(logging.INFO, logger="engine"):
        assert resolve_model("SomeOrg/Tiny-Chat") == snapshot
    expected = f"model SomeOrg/Tiny-Chat: from the local Hugging Face cache, {snapshot}"
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert resolve_model("someorg/tiny-chat") == snapshot  # found by scanning the cache: another spelling


def test_a_cached_snapshot_without_a_main_ref_is_found(hub):
    snapshot = write_hub_cache(hub, "SomeOrg/Pinned", resolve_model("tiny"), ref=None)
    assert resolve_model("SomeOrg/Pinned") == snapshot


def test_the_llm_runs_a_cached_hub_model(hub):
    from engine import LLM, SamplingParams

    write_hub_cache(hub, "SomeOrg/Tiny-Chat", resolve_model("tiny"))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    kwargs = {"max_model_len": 128, "kv_cache_memory": 16 << 20}
    from_hub = LLM("SomeOrg/Tiny-Chat", **kwargs)
    assert from_hub.llm_engine.model_dir.parent.parent.name == "models--SomeOrg--Tiny-Chat"
    from_preset = LLM("tiny", **kwargs)
    assert (from_hub.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids
            == from_preset.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids)


def test_dummy_weights_run_an_uncached_hub_id_as_its_preset(hub, caplog):
    with caplog.at_level(logging.INFO, logger="engine"):
        path = resolve_model("Qwen/Qwen2.5-0.5B-Instruct", with_weights=False)
    assert path.name == "qwen2.5-0.5b-noweights" and (path / "config.json").is_file()
    notes = [r.getMessage() for r in caplog.records if "Qwen/Qwen2.5-0.5B-Instruct" in r.getMessage()]
    assert len(notes) == 1 and "runs as the preset qwen2.5-0.5b" in notes[0]


def test_a_cached_hub_model_wins_over_the_preset_even_with_dummy_weights(hub):
    snapshot = write_hub_cache(hub, "Qwen/Qwen2.5-0.5B-Instruct", resolve_model("tiny"))
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct", with_weights=False) == snapshot


@pytest.mark.parametrize("name,hint", [("Qwen/Qwen2.5-7B-Instruct", "it runs as the preset qwen2.5-7b"),
                                       ("nobody/nothing", None), ("no-such-model", None)])
def test_an_unknown_model_is_one_line_listing_the_presets(hub, name, hint):
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model(name)
    message = str(exc.value)
    assert "\n" not in message and "never downloads" in message and str(hub) in message
    assert "Presets: " + ", ".join(PRESETS) in message
    assert (hint in message) if hint else "runs as the preset" not in message


def test_the_server_refuses_an_uncached_hub_id_in_one_line(hub):
    r = subprocess.run([sys.executable, "-m", "engine.server", "--model", "Qwen/Qwen2.5-7B-Instruct"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "--load-format dummy" in errors[0] and "qwen2.5-7b" in errors[0]
