"""Incremental detokenization: output token ids -> text, a few tokens at a time.

A fast (Rust) tokenizer decodes through `tokenizers`' DecodeStream, primed with the last prompt
tokens for context: about a microsecond a token, which matters when one API process streams tens
of thousands of tokens a second. Otherwise each step decodes only a short window (the tokens since
the last emitted text, plus the ones before them for context) and emits the new suffix, so the cost
per token is constant. A window whose text ends in U+FFFD is an incomplete UTF-8 character:
nothing is emitted until the next token completes it, so a multi-byte character is never split.
"""
from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first output token, for context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | tuple = (), include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self._text = ""
        self.stopped = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = None
        if backend is not None and DecodeStream is not None:
            self._backend = backend
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for t in prompt_token_ids[-_CONTEXT_TOKENS:]:  # context only: their text is not emitted
                self._stream.step(backend, t)
            return
        self._tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start
        self._read_offset = len(self._tokens)  # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def append(self, token_ids: list[int]) -> str | None:
        """Add new tokens; return the stop string if one now appears (the text is then cut exactly:
        before it, or after it with include_stop_str_in_output)."""
        if self.stopped or not token_ids:
            return None
        if self._stream is not None:
            old_len = len(self._text)
            for t in token_ids:
                piece = self._stream.step(self._backend, t)
                if piece:
                    self._text += piece
            return self._find_stop(old_len) if len(self._text) > old_len else None
        self._tokens.extend(token_ids)
        prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        window = self._decode(self._tokens[self._prefix_offset:])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return None  # nothing printable yet (an incomplete character or a skipped special token)
        old_len = len(self._text)
        self._text += window[len(prefix):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        return self._find_stop(old_len)

    def _find_stop(self, old_len: int) -> str | None:
        if not self.stop:
            return None
        search_from = max(0, old_len - self.max_stop_len + 1)
        hits = [(self._text.find(s, search_from), s) for s in self.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self._text = self._text[:index + len(stop)] if self.include_stop else self._text[:index]
        self.stopped = True
        return stop

    @property
    def text(self) -> str:
        return self._text

    def stable_text(self, finished: bool) -> str:
        """The text safe to show now. While running, a tail that could still grow into a stop string
        is held back, so streamed text never has to be taken back."""
        if finished or self.stopped or not self.stop:
            return self._text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self._text)), hold, -1):
                if self._text.endswith(s[:k]):
                    hold = k
                    break
        return self._text[:len(self._text) - hold]
