"""SamplingParams(prompt_logprobs=N): known answers on the tiny preset against a direct forward of the
model, under chunked prefill and prefix caching; the row selection by hand; the completions API shape."""
import httpx
import numpy as np
import openai
import pytest
import torch

from engine import LLM, SamplingParams
from engine.prompt_logprobs import select_prompt_rows
from tests.engine_helpers import (
    hf_model,
    model_dir,
    random_prompts,
    shared_prefix_prompts,
)
from tests.server_process import ServerProcess

TOP = 3


def reference(prompt: list[int]) -> torch.Tensor:
    """Log-softmax of transformers' logits: row q is the distribution of the token at q + 1."""
    with torch.no_grad():
        return torch.log_softmax(hf_model("tiny")(torch.tensor([prompt])).logits[0].float(), dim=-1)


def check_against_forward(prompt: list[int], got) -> None:
    ref = reference(prompt)
    assert got[0] is None and len(got) == len(prompt)
    for q in range(1, len(prompt)):
        entry, row, token = got[q], ref[q - 1], prompt[q]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4), f"position {q}"
        # Its rank in the whole distribution, up to ties within the tolerance.
        lo, hi = (int((row > row[token] + d).sum()) + 1 for d in (1e-4, -1e-4))
        assert lo <= entry[token].rank <= hi, f"position {q}: rank {entry[token].rank} not in [{lo}, {hi}]"
        top = row.topk(TOP)
        others = {t: lp for t, lp in entry.items() if t != token}
        assert set(others) <= set(top.indices.tolist()) and len(entry) in (TOP, TOP + 1)
        for rank, (t, value) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            if t in entry and t != token:
                assert entry[t].logprob == pytest.approx(value, abs=1e-4) and entry[t].rank == rank


SETTINGS = {
    "one-step": {},
    "chunked": {"max_num_batched_tokens": 16, "max_num_seqs": 4},  # prompts of 20-60 tokens: 2-4 chunks each
    "prefix-cache": {"enable_prefix_caching": True, "block_size": 16},
    # 14 blocks for 6 sequences growing by 40 tokens: preempted and recomputed, prompts scored once
    "preempting": {"num_gpu_blocks_override": 14, "block_size": 16, "max_model_len": 160, "max_num_batched_tokens": 32,
                   "max_num_seqs": 8},
}


@pytest.mark.parametrize("setting", SETTINGS)
def test_prompt_logprobs_match_a_direct_forward(setting):
    prompts = (shared_prefix_prompts(3, 4000, prefix_len=40, seed=4) if setting == "prefix-cache"
               else random_prompts(6 if setting == "preempting" else 4, 4000, seed=2, lo=20, hi=60))
    max_tokens = 40 if setting == "preempting" else 2
    llm = LLM(str(model_dir("tiny")), dtype="float32", **SETTINGS[setting])
    if setting == "prefix-cache":  # the shared prefix is cached before the scored requests arrive
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=1), use_tqdm=False)
    before = llm.llm_engine.get_stats()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=max_tokens, prompt_logprobs=TOP, ignore_eos=True), use_tqdm=False)
    after = llm.llm_engine.get_stats()
    for p, out in zip(prompts, outs):
        check_against_forward(p, out.prompt_logprobs)
        assert out.num_cached_tokens == 0
    if setting == "chunked":
        assert after.num_steps_total - before.num_steps_total >= 4, "the prompts were meant to be split"
    if setting == "preempting":
        assert after.num_preemptions_total > 0, "the small cache was meant to force preemption"
    if setting == "prefix-cache":
        # Scored requests compute every prompt row (no cache reads), but still fill the cache for others.
        assert after.prefix_cache_hits_total == before.prefix_cache_hits_total
        llm.generate([{"prompt_token_ids": prompts[1]}], SamplingParams(max_tokens=1), use_tqdm=False)
        assert llm.llm_engine.get_stats().prefix_cache_hits_total - after.prefix_cache_hits_total >= 32


def test_prompt_logprobs_zero_one_token_prompt_and_n():
    llm = LLM(str(model_dir("tiny")), dtype="float32", max_num_batched_tokens=8, max_num_seqs=4)
    prompt = random_prompts(1, 4000, seed=6, lo=13, hi=13)[0]
    one, zero, pair = llm.generate([{"prompt_token_ids": [prompt[0]]}, {"prompt_token_ids": prompt},
                                    {"prompt_token_ids": prompt}],
                                   [SamplingParams(max_tokens=1, prompt_logprobs=0),
                                    SamplingParams(max_tokens=1, prompt_logprobs=0),
                                    SamplingParams(n=2, max_tokens=3, prompt_logprobs=1, seed=1)], use_tqdm=False)
    assert one.prompt_logprobs == [None]
    ref = reference(prompt)
    assert [list(e) for e in zero.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]  # N=0: the prompt token only
    assert [e[t].logprob for e, t in zip(zero.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        [ref[q - 1, prompt[q]].item() for q in range(1, len(prompt))], abs=1e-4)
    assert len(pair.outputs) == 2 and len(pair.prompt_logprobs) == len(prompt)
    assert llm.llm_engine.get_stats().kv_cache_usage == 0.0
    with pytest.raises(ValueError, match="prompt_logprobs=21 exceeds max_logprobs"):
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(prompt_logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_logprobs must be non-negative"):
        SamplingParams(prompt_logprobs=-1)


def test_row_selection_by_hand():
    prompt = np.array([5, 6, 7, 8, 9, 10])
    # Chunk [0, 4) of a 6-token prompt, flat from row 10: rows 10..13 score the tokens at positions 1..4.
    rows = select_prompt_rows("r", prompt, 0, 0, 4, first_row=10, num_top=0)
    assert (rows.first_row, rows.target_ids) == (10, [6, 7, 8, 9])
    # Chunk [4, 6), 4 scored: only the row at position 4 scores a prompt token (5 predicts the first output).
    rows = select_prompt_rows("r", prompt, 4, 4, 6, first_row=0, num_top=0)
    assert (rows.first_row, rows.target_ids) == (0, [10])
    assert select_prompt_rows("r", prompt, 5, 0, 6, first_row=0, num_top=0) is None  # recomputed: nothing new
    assert select_prompt_rows("r", prompt, 5, 6, 7, first_row=0, num_top=0) is None  # a decode
    with pytest.raises(RuntimeError, match="never computed"):
        select_prompt_rows("g", np.array([1, 2, 3, 4]), 0, 2, 4, first_row=0, num_top=0)


# ---------------------------------------------------------------- the completions API (vLLM's shape)
@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("tiny", "--max-model-len", "256", "--kv-cache-memory", "16MiB", "--max-num-batched-tokens",
                        "16", "--max-num-seqs", "4")
    yield srv
    srv.stop()


def test_completions_prompt_logprobs_shape(server):
    prompt = random_prompts(1, 4000, seed=8, lo=30, hi=30)[0]
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, "prompt_logprobs": 2, "n": 2}
    res = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in res["choices"]] == [0, 1]
    plp = res["choices"][0]["prompt_logprobs"]
    assert res["choices"][1]["prompt_logprobs"] == plp  # vLLM: each choice of the prompt carries them
    assert plp[0] is None and len(plp) == len(prompt)
    ref = reference(prompt)
    for q in range(1, len(prompt)):
        entry = plp[q]
        assert str(prompt[q]) in entry and len(entry) in (2, 3)  # the prompt token and the top 2
        assert set(entry[str(prompt[q])]) == {"logprob", "rank", "decoded_token"}
        assert entry[str(prompt[q])]["logprob"] == pytest.approx(ref[q - 1, prompt[q]].item(), abs=1e-4)
        ranks = sorted(v["rank"] for k, v in entry.items() if k != str(prompt[q]))
        assert ranks in ([1, 2], [1], [2])  # the top two, one of them possibly the prompt token itself
    plain = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    chat = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=1, extra_body={"prompt_logprobs": 0})
    chat_plp = chat.model_extra["prompt_logprobs"]  # vLLM: on the chat response itself
    assert chat_plp[0] is None and all(len(e) == 1 for e in chat_plp[1:])


@pytest.mark.parametrize("body, message", [
    ({"stream": True, "prompt_logprobs": 1}, "not available when `stream=True`"),
    ({"prompt_logprobs": -1}, "-1, the whole vocabulary, is not supported"),
    ({"prompt_logprobs": 21}, "exceeds the server's max_logprobs"),
])
def test_completions_prompt_logprobs_refusals(server, body, message):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 1, **body}, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt_logprobs"
