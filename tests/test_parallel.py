"""Tensor and pipeline parallelism on CPU worker processes (gloo): the sharded layers against the plain
ones, the engine's greedy tokens under TP / PP / TP x PP against one process, and a worker's crash."""
from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from engine.distributed.state import stage_layers
from tests import parallel_helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_layers_are_contiguous_and_cover_the_model():
    assert stage_layers(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(8, 3) == [range(0, 3), range(3, 6), range(6, 8)]
    assert stage_layers(3, 1) == [range(0, 3)]


def test_sharded_layers_equal_the_plain_ones_on_two_gloo_ranks():
    mp.spawn(parallel_helpers.sharded_layers_match, args=(2, f"tcp://127.0.0.1:{free_port()}"), nprocs=2, join=True)


# ---------------------------------------------------------------- the engine over worker processes
ENGINE = dict(device="cpu", dtype="float32", enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=32, max_num_seqs=8, num_gpu_blocks_override=256, max_model_len=256)


def _prompts() -> list[list[int]]:
    from tests.engine_helpers import random_prompts

    prompts = random_prompts(4, 4000, seed=1, lo=5, hi=60)  # several longer than a 32-token chunk
    prompts.append(prompts[1][:40] + [11, 12, 13])  # a prefix-cache hit on two full blocks
    return prompts


def _greedy(llm, prompts, max_tokens=12) -> list[list[int]]:
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False)]


@pytest.fixture(scope="module")
def single_process_tokens():
    from engine import LLM

    llm = LLM(str(parallel_helpers.kv1_llama_dir()), **ENGINE)
    try:
        return _greedy(llm, _prompts())
    finally:
        llm.llm_engine.shutdown()


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_greedy_equals_one_process(tp, pp, single_process_tokens):
    from engine import LLM

    before = _children()
    llm = LLM(str(parallel_helpers.kv1_llama_dir()), tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE)
    try:
        pids = llm.llm_engine.core.executor.pids
        assert len(pids) == tp * pp
        assert _greedy(llm, _prompts()) == single_process_tokens
        stats = llm.llm_engine.get_stats()
        assert stats.prefix_cache_hits_total > 0
        if pp > 1:  # one step in flight per stage while the host reads the oldest
            from engine import SamplingParams

            engine, most = llm.llm_engine, 0
            for i, prompt in enumerate(_prompts()[:4]):
                engine.add_request(f"x{i}", prompt, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
                most = max(most, len(engine.core._in_flight))
            assert most == pp
    finally:
        llm.llm_engine.shutdown()
    assert _children() <= before  # every worker stopped


def _gone(pids, timeout: float = 10.0) -> bool:
    """Every pid has exited (a zombie not reaped by a container's init counts as gone)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_a_killed_worker_fails_the_engine_and_leaves_no_process():
    import os
    import signal

    from engine import LLM, SamplingParams
    from engine.executor import WorkerFailure

    llm = LLM(str(parallel_helpers.kv1_llama_dir()), tensor_parallel_size=2, **ENGINE)
    engine = llm.llm_engine
    pids = engine.core.executor.pids
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(_prompts()):
        engine.add_request(str(i), prompt, params)
    for _ in range(3):
        engine.step()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerFailure, match=rf"worker 1 \(pid {pids[1]}\)"):
        for _ in range(1000):
            engine.step()
    assert _gone(pids)  # the other worker was killed too
    with pytest.raises(WorkerFailure):  # and the engine says so again, rather than hang
        engine.step()
    engine.shutdown()


@pytest.mark.slow
def test_workers_exit_when_the_engine_is_terminated(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run_engine.py"
    script.write_text(
        "import json, sys, time\n"
        "from engine import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(parallel_helpers.kv1_llama_dir())!r}, pipeline_parallel_size=2, **{ENGINE!r})\n"
        "    print(json.dumps(llm.llm_engine.core.executor.pids), flush=True)\n"
        "    time.sleep(600)\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = json.loads(proc.stdout.readline())
        assert len(pids) == 2
        proc.send_signal(signal.SIGTERM)  # no clean-up runs in the engine: the workers notice on their own
        proc.wait(30)
        assert _gone(pids), "worker processes outlived the engine"
    finally:
        proc.kill()


@pytest.mark.slow
def test_served_path_starts_the_workers_from_its_engine_core(single_process_tokens):
    import httpx
    import psutil

    from tests.server_process import ServerProcess

    srv = ServerProcess(str(parallel_helpers.kv1_llama_dir()), "--tensor-parallel-size", "2", "--device", "cpu",
                        "--num-gpu-blocks-override", "256", "--max-model-len", "256", "--max-num-seqs", "8",
                        "--max-num-batched-tokens", "32", "--enable-prefix-caching", timeout=240)
    try:
        tree = psutil.Process(srv.proc.pid).children(recursive=True)
        workers = [p for p in tree if p.parent() is not None and p.parent().pid != srv.proc.pid
                   and p.parent().pid in {c.pid for c in tree}]
        assert len(workers) == 2  # the engine core's children
        prompt = _prompts()[0]
        body = {"model": str(parallel_helpers.kv1_llama_dir()), "prompt": prompt, "max_tokens": 12,
                "temperature": 0.0, "ignore_eos": True, "logprobs": 0}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        from engine.model_loader import load_tokenizer

        tokenizer = load_tokenizer(parallel_helpers.kv1_llama_dir())
        # (the streaming detokenizer holds back a last token that ends inside a UTF-8 character)
        want = tokenizer.decode(single_process_tokens[0]).rstrip("\ufffd")
        assert r.json()["choices"][0]["text"].rstrip("\ufffd") == want
    finally:
        code = srv.stop()
    assert code == 0, srv.output()
    assert _gone([p.pid for p in tree])


def test_pipelined_schedule_keeps_in_flight_requests_out_and_splits_the_batch():
    """PP 2: a step takes at most max_num_seqs / 2 sequences, and a request whose token is still in the
    pipeline is not scheduled until the token is back; prompt chunks may follow each other."""
    from engine.block_manager import BlockManager
    from engine.scheduler import Scheduler
    from tests.test_block_manager import FakeConfig, make_seq

    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(FakeConfig(max_num_seqs=4, max_num_batched_tokens=16, pipeline_parallel_size=2), bm)
    seqs = [make_seq(i, [1] * 5, max_tokens=20) for i in range(4)] + [make_seq(9, [1] * 30, max_tokens=2)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    second = sched.schedule()
    assert [s.request_id for s in first.seqs] == ["0", "1"]  # 2 of max_num_seqs 4: the batch splits
    assert [s.request_id for s in second.seqs] == ["2", "3"]  # 0 and 1 wait for their tokens
    assert not sched.schedule()  # everything running is in flight
    for s in first.seqs:  # step 1's tokens arrive
        s.token_ids.append(7)
    third = sched.schedule()
    assert [s.request_id for s in third.seqs] == ["0", "1"]
    assert all(n == 1 for n in third.num_new_tokens)

    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(FakeConfig(max_num_seqs=4, max_num_batched_tokens=16, pipeline_parallel_size=2), bm)
    long = make_seq(0, [1] * 40, max_tokens=2)
    sched.add(long)
    chunks = [sched.schedule().num_new_tokens for _ in range(3)]
    assert chunks == [[16], [16], [8]]  # chunk after chunk, no token between them
    assert not sched.schedule()  # the last chunk samples: in flight now


def test_tune_searches_the_parallel_sizes_and_prechecks_their_shapes():
    from workbench.tune.precheck import refuse
    from workbench.tune.study_file import StudyFile
    from workbench.tune.trial import render_flags

    study = StudyFile.model_validate({
        "study": {"name": "parallel", "model": "tiny", "n_trials": 2},
        "search_space": {"tensor_parallel_size": {"type": "categorical", "choices": [1, 2]},
                         "pipeline_parallel_size": {"type": "int", "low": 1, "high": 2}},
        "objectives": [{"metric": "output_throughput", "direction": "maximize"}]})
    assert set(study.search_space) == {"tensor_parallel_size", "pipeline_parallel_size"}
    assert render_flags({"tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == \
        "--tensor-parallel-size 2 --pipeline-parallel-size 2"
    assert refuse("tiny", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, None)[0] is None
    assert "divisible by tensor_parallel_size (3)" in refuse("tiny", {"tensor_parallel_size": 3}, None)[0]
    assert "exceeds num_hidden_layers" in refuse("tiny", {"pipeline_parallel_size": 5}, None)[0]


def test_parallel_settings_are_checked_with_one_line_errors():
    from engine import LLM
    from engine.config import ConfigError

    for kwargs, match in [({"tensor_parallel_size": 3}, "num_attention_heads .4. must be divisible"),
                          ({"pipeline_parallel_size": 9}, "exceeds num_hidden_layers"),
                          ({"tensor_parallel_size": 0}, "at least 1"),
                          ({"distributed_executor_backend": "ray"}, "Ray"),
                          ({"distributed_executor_backend": "uni", "tensor_parallel_size": 2}, "use 'mp'"),
                          ({"enable_lora": True, "tensor_parallel_size": 2}, "enable_lora")]:
        with pytest.raises(ConfigError, match=match) as info:
            LLM("tiny", device="cpu", **kwargs)
        assert "\n" not in str(info.value)
