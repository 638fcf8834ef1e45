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
    finally:
        llm.llm_engine.shutdown()
    assert _children() <= before  # every worker stopped
