"""vLLM habits that carry over: trust_remote_code, --model as a flag, engine.__version__, and every
vLLM flag we do not build refused by name (one line, exit 2)."""
import importlib.metadata
import logging
import subprocess
import sys

import pytest

import engine
from engine import EngineConfig
from engine.config import _note_no_remote_code
from engine.server.args import ArgsError, build_parser, engine_config, parse_server_args
from engine.server.vllm_flags import ENGINE, SERVER
from engine.version import source_tree_version


# ---------------------------------------------------------------- engine.__version__
def test_version_is_the_installed_distributions():
    try:
        installed = importlib.metadata.version("pagedbench")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pagedbench is not installed; the source-tree fallback is tested below")
    assert engine.__version__ == installed


def test_version_fallback_for_a_source_tree(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "pagedbench"\nversion = "1.2.3"\n')
    assert source_tree_version(tmp_path / "pyproject.toml") == "1.2.3+source"
    assert source_tree_version(tmp_path / "missing.toml") == "0+unknown"


# ---------------------------------------------------------------- trust_remote_code
def test_trust_remote_code_is_accepted_and_said_once(caplog):
    _note_no_remote_code.cache_clear()
    with caplog.at_level(logging.INFO, logger="engine"):
        EngineConfig("tiny")
        assert not [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
        first = EngineConfig("tiny", trust_remote_code=True)
        EngineConfig("tiny", trust_remote_code=True)
    notes = [r for r in caplog.records if "trust_remote_code" in r.getMessage()]
    assert first.trust_remote_code and len(notes) == 1
    assert "no effect" in notes[0].getMessage()


def test_llm_takes_trust_remote_code():
    from engine import LLM, SamplingParams

    llm = LLM("tiny", trust_remote_code=True, max_model_len=128, kv_cache_memory=16 << 20)
    out = llm.generate("hi", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_trust_remote_code_flag_reaches_the_config():
    assert engine_config(parse_server_args(["tiny", "--trust-remote-code"])).trust_remote_code
    assert not engine_config(parse_server_args(["tiny"])).trust_remote_code


# ---------------------------------------------------------------- --model
def test_model_as_positional_or_flag():
    assert parse_server_args(["tiny"]).model == "tiny"
    assert parse_server_args(["--model", "tiny"]).model == "tiny"
    assert parse_server_args(["tiny", "--model", "tiny"]).model == "tiny"  # the same twice is no conflict
    assert "model_flag" not in vars(parse_server_args(["--model", "tiny"]))
    with pytest.raises(ArgsError, match="given twice"):
        parse_server_args(["tiny", "--model", "qwen2.5-0.5b"])
    with pytest.raises(ArgsError, match="no model given"):
        parse_server_args([])


def test_model_conflict_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "-m", "engine.server", "tiny", "--model", "other"], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "given twice" in r.stderr, r.stderr


# ---------------------------------------------------------------- logging flags
def test_log_flags_reach_the_engine_and_the_api_settings():
    from engine.server.__main__ import api_settings

    args = parse_server_args(["tiny"])
    config, settings = engine_config(args), api_settings(args, engine_config(args))
    assert not config.disable_log_stats and settings.access_log and settings.log_requests  # vLLM's defaults: on
    assert settings.max_log_len is None and settings.uvicorn_log_level is None
    args = parse_server_args(["tiny", "--disable-log-stats", "--disable-log-requests", "--disable-uvicorn-access-log",
                              "--max-log-len", "10", "--uvicorn-log-level", "warning"])
    config, settings = engine_config(args), api_settings(args, engine_config(args))
    assert config.disable_log_stats and not settings.access_log and not settings.log_requests
    assert settings.max_log_len == 10 and settings.uvicorn_log_level == "warning"
    args = parse_server_args(["tiny", "--disable-log-requests", "--enable-log-requests"])
    assert api_settings(args, engine_config(args)).log_requests  # the last one given wins


# ---------------------------------------------------------------- vLLM flags we do not build
def _refusal(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser("serve").parse_args(["tiny", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage dump
    return err


@pytest.mark.parametrize("flag", ENGINE + SERVER, ids=lambda f: f.flags[0])
def test_every_unbuilt_vllm_flag_is_refused_by_name(flag, capsys):
    argv = [flag.flags[0]] if flag.switch else [flag.flags[0], "something-else"]
    err = _refusal(argv, capsys)
    assert f"{flag.flags[0]}" in err and "is not supported by this engine" in err and flag.what in err


@pytest.mark.parametrize("argv,says", [
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8 is not supported by this engine (stores the KV cache"),
    (["--cpu-offload-gb", "4"], "leave it at 0"),
    (["-dp", "2"], "--data-parallel-size 2 is not supported"),
    (["--enable-expert-parallel"], "--enable-expert-parallel is not supported"),
    (["--guided-decoding-backend", "xgrammar"], "structured output"),
    (["--enable-sleep-mode"], "--enable-sleep-mode is not supported"),
    (["--kv-transfer-config", '{"kv_connector": "x"}'], "--kv-transfer-config"),
])
def test_refusals_name_the_flag_and_what_it_does(argv, says, capsys):
    assert says in _refusal(argv, capsys)


def test_unbuilt_flags_at_their_off_value_are_accepted():
    args = parse_server_args(["tiny", "--kv-cache-dtype", "auto", "--cpu-offload-gb", "0", "--swap-space", "0",
                              "-dp", "1", "--scheduling-policy", "fcfs", "--task", "generate", "--config-format=hf"])
    config = engine_config(args)  # nothing of them reaches the namespace, so the config is the default one
    assert config == engine_config(parse_server_args(["tiny"]))


def test_refused_flag_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "engine.server", "tiny", "--kv-cache-dtype", "fp8_e4m3"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--kv-cache-dtype fp8_e4m3 is not supported by this engine" in r.stderr
