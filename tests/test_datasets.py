import json

import pytest
from transformers import AutoTokenizer

from engine.presets import resolve_model
from workbench.datasets import sample_requests


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_model("tiny", with_weights=False)))


def test_random_prompts_have_exact_lengths(tokenizer):
    reqs = sample_requests("random", num_prompts=30, input_len=80, output_len=9, range_ratio=0.5, seed=2,
                           tokenizer=tokenizer)
    for r in reqs:
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 40 <= r.prompt_len <= 120 and 4 <= r.output_len <= 13
    again = sample_requests("random", num_prompts=30, input_len=80, output_len=9, range_ratio=0.5, seed=2,
                            tokenizer=tokenizer)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


def test_prefix_repeat_shares_prefixes(tokenizer):
    reqs = sample_requests("prefix-repeat", num_prompts=6, input_len=20, output_len=4, tokenizer=tokenizer,
                           prefix_len=50, num_prefixes=2)
    assert reqs[0].prompt[:100] == reqs[2].prompt[:100] != reqs[1].prompt[:100]


def test_jsonl_and_sharegpt(tmp_path, tokenizer):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "hello there", "output_len": 7}) + "\n" + json.dumps({"prompt": "x y"}) + "\n")
    reqs = sample_requests("jsonl", num_prompts=2, input_len=1, output_len=5, path=str(jl), tokenizer=tokenizer)
    assert sorted(r.output_len for r in reqs) == [5, 7]
    sg = tmp_path / "s.json"
    sg.write_text(json.dumps([{"conversations": [{"from": "human", "value": "What is a cache?"},
                                                 {"from": "gpt", "value": "A place to keep things nearby."}]},
                              {"conversations": [{"from": "human", "value": "lonely"}]}]))
    reqs = sample_requests("sharegpt", num_prompts=3, input_len=1, output_len=0, path=str(sg), tokenizer=tokenizer)
    assert len(reqs) == 3 and reqs[0].output_len == len(tokenizer.encode("A place to keep things nearby.",
                                                                         add_special_tokens=False))


@pytest.mark.parametrize("content,message", [("{bad\n", "p.jsonl:1: not valid JSON"),
                                              ('{"text": "x"}\n', "needs a string field 'prompt'")])
def test_malformed_files_name_the_line(tmp_path, content, message):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=message):
        sample_requests("jsonl", num_prompts=1, input_len=1, output_len=1, path=str(f))
    with pytest.raises(ValueError, match="no such file"):
        sample_requests("sharegpt", num_prompts=1, input_len=1, output_len=1, path=str(tmp_path / "none.json"))


def test_length_distributions_stay_exact(tokenizer):
    reqs = sample_requests("random", num_prompts=20, input_len="lognormal:3.5,0.4", output_len="uniform:3,6",
                           seed=4, tokenizer=tokenizer)
    assert len({r.prompt_len for r in reqs}) > 5  # drawn, not fixed
    for r in reqs:
        assert len(tokenizer.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 3 <= r.output_len <= 6
    with pytest.raises(ValueError, match="takes its lengths from the file"):
        sample_requests("jsonl", num_prompts=1, input_len="uniform:1,2", output_len=1, path="x.jsonl")
