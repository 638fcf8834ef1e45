"""vLLM's Python API on the tiny preset: sampling, stops, n, finish reasons, chat, errors."""
import json
import random

import pytest

from engine import LLM, ConfigError, SamplingParams
from tests.engine_helpers import model_dir


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", seed=0, max_model_len=256)


def prompt_ids(seed=0, n=6):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(10, 3000) for _ in range(rng.randint(5, 40))]} for _ in range(n)]


def texts(outs):
    return [[c.text for c in o.outputs] for o in outs]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt_ids(n=1), params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = prompt_ids(seed=4, n=5)
    mixed = llm.generate(crowd[:2] + prompt_ids(n=1) + crowd[2:], [SamplingParams(temperature=1.0, max_tokens=12)] * 2
                         + [params] + [SamplingParams(temperature=1.0, max_tokens=12)] * 3, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other = llm.generate(prompt_ids(n=1), SamplingParams(temperature=1.0, seed=124, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(prompt_ids(), SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)
    top1 = llm.generate(prompt_ids(), SamplingParams(temperature=0.8, top_k=1, max_tokens=10), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_stop_string_cuts_text_exactly(llm):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                             stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                              stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_finish_reasons(llm):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    out = llm.generate(prompt_ids(n=1), params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 8
    stop_id = out.token_ids[4]
    first = out.token_ids.index(stop_id)
    stopped = llm.generate(prompt_ids(n=1), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                           stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    assert stopped.token_ids == out.token_ids[:first + 1]
    # min_tokens holds the stop token back.
    held = llm.generate(prompt_ids(n=1), SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, ignore_eos=True,
                                                        stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) == 8 and held.finish_reason == "length"


def test_eos_stops_unless_ignored(llm):
    eos = llm.get_tokenizer().eos_token_id
    # Force EOS by making it the only allowed continuation through a huge logit bias is not in the API;
    # instead check that ignore_eos=False never emits tokens after an EOS.
    outs = llm.generate(prompt_ids(n=6), SamplingParams(temperature=1.0, seed=1, max_tokens=40), use_tqdm=False)
    for o in outs:
        ids = o.outputs[0].token_ids
        if eos in ids:
            assert ids.index(eos) == len(ids) - 1 and o.outputs[0].finish_reason == "stop"


def test_n_gives_n_outputs(llm):
    out = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_logprobs_are_normalised(llm):
    out = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4, logprobs=3), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the most likely token
        assert all(lp.logprob <= 0 for lp in entry.values())


def test_chat_and_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "Hi there" in text
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0]
    assert out.prompt == text
    assert out.prompt_token_ids == tok.encode(text, add_special_tokens=False)


def test_text_prompts_and_output_shape(llm):
    outs = llm.generate(["Hello world", "Ünïcödé 🙂 text"], SamplingParams(temperature=0.0, max_tokens=5),
                        use_tqdm=False)
    assert [o.prompt for o in outs] == ["Hello world", "Ünïcödé 🙂 text"]
    assert all(o.finished and o.prompt_token_ids for o in outs)
    assert "\ufffd" not in "".join(t for o in texts(outs) for t in o)


def test_prompt_longer_than_max_model_len_is_refused(llm):
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [11] * 300}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_generation_stops_at_max_model_len():
    llm = LLM("tiny", max_model_len=40)
    out = llm.generate({"prompt_token_ids": [11] * 30}, SamplingParams(temperature=0.0, max_tokens=100,
                                                                     ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


@pytest.mark.parametrize("option,value", [("quantization", "awq"),  # tiny is dense: no AWQ checkpoint
                                          ("distributed_executor_backend", "ray")])
def test_options_that_cannot_work_are_refused_by_name(option, value):
    with pytest.raises(ConfigError, match=option):
        LLM("tiny", **{option: value})


def test_unknown_argument_is_refused():
    with pytest.raises(TypeError, match="bogus"):
        LLM("tiny", bogus=1)


def test_malformed_model_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path))
    src = model_dir("tiny")
    bad = tmp_path / "noweights"
    bad.mkdir()
    for f in src.iterdir():
        if not f.name.endswith(".safetensors"):
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="safetensors"):
        LLM(str(bad))


def test_dummy_load_format_runs():
    llm = LLM("tiny", load_format="dummy", dtype="bfloat16")
    out = llm.generate("Hi", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_memory_profile_parts_add_up_to_the_budget():
    from engine.config import EngineConfig, GiB
    from engine.kv_cache import MemoryProfile, check_kv_budget

    profile = MemoryProfile(total=80 * GiB, utilization=0.9, earlier=GiB, weights=2 * GiB, batch_buffers=GiB // 2,
                            activation_peak=3 * GiB, non_torch=GiB, cuda_graphs=GiB // 4)
    parts = (profile.earlier + profile.weights + profile.batch_buffers + profile.activation_peak + profile.non_torch
             + profile.cuda_graphs + profile.kv_budget)
    assert parts == profile.budget == int(72 * GiB)
    assert "CUDA graphs 0.25 GiB" in profile.describe() and "KV cache 64.25 GiB" in profile.describe()
    squeezed = MemoryProfile(total=8 * GiB, utilization=0.5, earlier=0, weights=4 * GiB, batch_buffers=0,
                             activation_peak=GiB, non_torch=0, cuda_graphs=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        check_kv_budget(EngineConfig(model="x", device="cpu"), squeezed)


def test_an_id_aborted_and_reused_at_once_gets_only_its_own_tokens(llm):
    """The step in flight still carries the aborted request's row: its token must not reach the new
    request of the same id (the core reads a step's tokens against that step's own sequences)."""
    from engine.messages import CoreRequest

    core = llm.llm_engine.core
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first, second = (p["prompt_token_ids"] for p in prompt_ids(seed=7, n=2))
    expected = llm.generate([{"prompt_token_ids": second}], params, use_tqdm=False)[0].outputs[0].token_ids
    core.add_request(CoreRequest.from_params("x", first, params, 0.0))
    core.step()
    core.step()  # one token read, one in flight
    core.abort(["x"])
    core.add_request(CoreRequest.from_params("x", second, params, 0.0))
    tokens = []
    while core.has_unfinished_requests():
        tokens += [t for out in core.step() for t in out.new_token_ids]
    assert tokens == expected


def test_each_step_launches_before_the_previous_tokens_are_read(llm, monkeypatch):
    """The one-step overlap: step N+1 is launched (its decode input gathered from step N's output on
    the device) before the host reads step N's tokens; stops are found one step late."""
    from engine.model_runner import PendingOutput

    runner, events = llm.llm_engine.runner, []
    launch, read = runner.execute_model, PendingOutput.result

    def execute_model(plan):
        pending = launch(plan)
        pending.step_number = sum(1 for e in events if e[0] == "launch") + 1
        events.append(("launch", pending.step_number))
        return pending

    def result(self):
        events.append(("read", self.step_number))
        return read(self)

    monkeypatch.setattr(runner, "execute_model", execute_model)
    monkeypatch.setattr(PendingOutput, "result", result)
    out = llm.generate(prompt_ids(n=1), SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5
    for k in range(1, 5):  # steps 1..4 sample tokens 1..4; token 5 ends the request by length
        assert events.index(("launch", k + 1)) < events.index(("read", k)), events


def test_the_memory_profile_step_runs_the_real_path():
    """The GPU memory profile's step (engine/worker.py), on CPU: a plan of max_num_batched_tokens prompt
    tokens with every costly sampling option, through plan -> batch -> inputs -> forward -> sampler,
    against a scratch cache; afterwards the batch is empty, its block table cleared, the engine intact."""
    from engine.kv_cache import allocate_kv_cache

    llm = LLM("tiny", max_model_len=128, max_num_seqs=16, max_num_batched_tokens=200, kv_cache_memory=16 << 20)
    core, runner = llm.llm_engine.core, llm.llm_engine.runner
    expected = llm.generate(prompt_ids(n=2), SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    plan, num_blocks = runner.profile_plan()
    assert plan.total_num_scheduled_tokens == 200 and len(plan.new_requests) == 16
    real_cache = runner.kv_caches
    runner.bind_cache(allocate_kv_cache(core.config, num_blocks, runner.device))
    runner.run_profile_plan(plan)
    runner.bind_cache(real_cache)
    assert len(runner.batch) == 0 and not runner.batch.block_table.host.any()
    assert not [r for r in runner.requests if r.startswith("profile-")]
    again = llm.generate(prompt_ids(n=2), SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in expected]
