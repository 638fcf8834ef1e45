"""Known answers for incremental detokenizing and the front end's output processing
(engine/detokenizer.py, engine/output_processor.py), on the tiny preset's byte-level BPE tokenizer:
characters split across byte-level tokens, stop strings split across tokens, include_stop_str_in_output,
skip_special_tokens, and stops found by token ids."""
from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.messages import CoreOutput
from engine.model_loader import load_tokenizer
from engine.output_processor import OutputProcessor
from engine.presets import resolve_model
from engine.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("tiny", with_weights=False))


class SlowTokenizer:
    """The tokenizer without its Rust backend: the detokenizer's windowed path."""

    def __init__(self, tok):
        self._tok = tok

    def decode(self, ids, **kw):
        return self._tok.decode(ids, **kw)


def both_paths(tok):
    return [tok, SlowTokenizer(tok)]


def feed(detok: IncrementalDetokenizer, ids: list[int]) -> tuple[list[str], str | None]:
    """One token at a time; the text after each, and the stop string if one ended it."""
    texts, stop = [], None
    for t in ids:
        stop = detok.append([t])
        texts.append(detok.text)
        if stop is not None:
            break
    return texts, stop


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_split_utf8_characters_are_never_shown_half_done(tok, path):
    text = "Ünïcödé 🙂 日本語 text"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()) + 8  # the multi-byte characters really are split into byte tokens
    prompt = tok.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok if path == "fast" else SlowTokenizer(tok), prompt)
    texts, _ = feed(detok, ids)
    assert texts[-1] == text
    assert all("\ufffd" not in t for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # text only ever grows
    first = ids.index(tok.encode("🙂", add_special_tokens=False)[0])  # 🙂 is four byte tokens
    assert texts[first - 1] == texts[first] == texts[first + 1] == texts[first + 2]  # nothing until its last
    assert texts[first + 3].endswith("🙂")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("path", ["fast", "slow"])
def test_stop_string_split_across_tokens_cuts_exactly(tok, include, path):
    ids = tok.encode("hello world, and more", add_special_tokens=False)  # 'he' 'l' 'lo' ' wor' 'ld' ...
    detok = IncrementalDetokenizer(tok if path == "fast" else SlowTokenizer(tok), [], stop=["lo wo"],
                                   include_stop_str_in_output=include)
    texts, stop = feed(detok, ids)
    assert stop == "lo wo"
    assert detok.text == ("hello wo" if include else "hel")
    assert detok.stable_text(finished=True) == detok.text
    assert detok.append(ids[-1:]) is None and detok.text == ("hello wo" if include else "hel")  # stays stopped


def test_running_text_holds_back_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["lo wo"])
    ids = tok.encode("hello", add_special_tokens=False)
    detok.append(ids)
    assert detok.text == "hello"
    assert detok.stable_text(finished=False) == "hel"  # "lo" may start "lo wo": not streamed yet
    assert detok.stable_text(finished=True) == "hello"


@pytest.mark.parametrize("path", ["fast", "slow"])
def test_skip_special_tokens(tok, path):
    special = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("hi", add_special_tokens=False) + [special] + tok.encode(" there", add_special_tokens=False)
    shown = IncrementalDetokenizer(tok if path == "fast" else SlowTokenizer(tok), [], skip_special_tokens=False)
    hidden = IncrementalDetokenizer(tok if path == "fast" else SlowTokenizer(tok), [], skip_special_tokens=True)
    feed(shown, ids)
    feed(hidden, ids)
    assert shown.text == "hi<|im_end|> there"
    assert hidden.text == "hi there"


# ---------------------------------------------------------------- the front end's output processing
def run(processor: OutputProcessor, rid: str, outputs: list[CoreOutput]):
    done = None
    for out in outputs:
        done = processor.process([out])
        if rid not in processor.requests:
            break
    return done


def test_stop_string_finishes_the_request_and_asks_the_core_to_drop_it(tok):
    processor = OutputProcessor(tok)
    processor.add_request("s", None, [5, 6], SamplingParams(max_tokens=20, stop=["lo wo"]), 0.0)
    ids = tok.encode("hello world", add_special_tokens=False)
    done = run(processor, "s", [CoreOutput("s", [t]) for t in ids])
    state = done.touched[0]
    assert done.to_abort == ["s"] and state.finished
    out = processor.make_output(state).outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == ("hel", "stop", "lo wo")


def test_stop_token_text_is_not_shown_and_offline_text_is_decoded_once(tok):
    """A stop by token id (EOS or stop_token_ids, found by the core) ends the output without its text;
    FINAL_ONLY requests (offline) decode once at the end, to the same text."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok.encode("Ünïcödé 🙂", add_special_tokens=False)
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.FINAL_ONLY):
        processor = OutputProcessor(tok)
        processor.add_request("r", None, [5],
                              SamplingParams(max_tokens=40, skip_special_tokens=False, output_kind=kind),
                              0.0)
        outs = [CoreOutput("r", [t]) for t in ids] + [CoreOutput("r", [eos], finish_reason="stop")]
        done = run(processor, "r", outs)
        assert done.to_abort == []
        out = processor.make_output(done.touched[0]).outputs[0]
        assert out.text == "Ünïcödé 🙂" and out.token_ids == ids + [eos] and out.finish_reason == "stop"


def test_n_samples_fan_out_and_finish_separately(tok):
    processor = OutputProcessor(tok)
    core = processor.add_request("n", None, [5], SamplingParams(n=2, max_tokens=3, seed=4), 0.0)
    assert [c.request_id for c in core] == ["n#0", "n#1"] and [c.params.get("seed") for c in core] == [4, 5]
    processor.process([CoreOutput("n#0", [11], finish_reason="length")])
    assert "n" in processor.requests  # one sample still runs
    done = processor.process([CoreOutput("n#1", [12], finish_reason="length")])
    out = processor.make_output(done.touched[0])
    assert out.finished and [c.token_ids for c in out.outputs] == [[11], [12]]
