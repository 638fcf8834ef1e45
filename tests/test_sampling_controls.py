"""logit_bias, allowed_token_ids and the vocabulary checks of the Python API (vLLM's semantics)."""
import pytest

from engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", max_model_len=128, kv_cache_memory=16 << 20)


def tokens(llm, **kw) -> list[int]:
    return llm.generate(["once upon"], SamplingParams(max_tokens=6, ignore_eos=True, **kw), use_tqdm=False)[0] \
        .outputs[0].token_ids


def test_allowed_token_ids_and_logit_bias_steer_sampling(llm):
    assert set(tokens(llm, temperature=1.0, seed=3, allowed_token_ids=[11, 12])) <= {11, 12}
    assert tokens(llm, temperature=0.0, logit_bias={42: 100.0}) == [42] * 6
    plain = tokens(llm, temperature=0.0)
    assert tokens(llm, temperature=0.0, logit_bias={plain[0]: -100.0})[0] != plain[0]


def test_top_k_past_the_vocabulary_keeps_every_token(llm):
    assert tokens(llm, temperature=0.0, top_k=10**6) == tokens(llm, temperature=0.0)


@pytest.mark.parametrize("kw,field", [({"stop_token_ids": [10**6]}, "stop_token_ids"),
                                      ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
                                      ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
                                      ({"logprobs": 21}, "logprobs")])
def test_out_of_range_ids_raise_value_error_naming_the_field(llm, kw, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(["x"], SamplingParams(max_tokens=2, **kw), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kw,field", [({"seed": 2**64}, "seed"), ({"logit_bias": {1: 101.0}}, "logit_bias"),
                                      ({"allowed_token_ids": []}, "allowed_token_ids")])
def test_sampling_params_checks(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_a_failing_detokenizer_fails_only_its_request():
    """Output processing runs in the API process's one output loop: one bad request must not stop it."""
    from engine.messages import CoreOutput
    from engine.model_loader import load_tokenizer
    from engine.output_processor import OutputProcessor
    from engine.presets import resolve_model

    processor = OutputProcessor(load_tokenizer(resolve_model("tiny", with_weights=False)))
    for rid in ("bad", "good"):
        processor.add_request(rid, None, [5, 6, 7], SamplingParams(max_tokens=4), 0.0)

    def explode(_ids):
        raise RuntimeError("boom")

    processor.requests["bad"].samples[0].detokenizer.append = explode
    done = processor.process([CoreOutput("bad", [9]), CoreOutput("good", [9])])
    assert done.to_abort == ["bad"]
    bad, good = done.touched
    assert bad.finished and "boom" in bad.error and not good.finished and good.error is None
