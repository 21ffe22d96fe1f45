"""Incremental detokenization that never emits broken UTF-8, with stop strings held back.

Text for new tokens is the difference between decoding a short window of recent tokens with and
without them (the window keeps SentencePiece's leading spaces and multi-token characters right).
While a character is incomplete the decoder yields U+FFFD, so nothing is emitted until it
completes. Up to ``len(longest stop string) - 1`` characters are held back, because they might
still turn into a stop string; they are released when the request finishes.
"""

from __future__ import annotations

from engine.request import SamplingParams

CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, so the first piece gets its spacing right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # the output text so far (stop string cut off once found)
        self.emitted = 0  # characters of self.text already handed out
        self.stops = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.hold_back = max((len(s) for s in self.stops), default=1) - 1
        self.stop_string: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> None:
        """Append a token; sets ``stop_string`` when the text now contains one."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character or a token with no text: wait for more
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if len(self.ids) > 4 * CONTEXT_TOKENS:  # keep the window short
            drop = self.prefix_offset
            self.ids = self.ids[drop:]
            self.prefix_offset, self.read_offset = 0, self.read_offset - drop
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += full[len(prefix):]
        if self.stops:
            self._find_stop(search_from)

    def _find_stop(self, search_from: int) -> None:
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            index, stop = min(hits)
            self.stop_string = stop
            self.text = self.text[: index + len(stop) if self.include_stop else index]

    def take(self, finished: bool) -> str:
        """Text that is safe to hand out now (everything, once finished)."""
        end = len(self.text) if finished or self.stop_string else max(self.emitted, len(self.text) - self.hold_back)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
