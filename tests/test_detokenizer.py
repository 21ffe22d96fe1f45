"""Incremental detokenization: UTF-8 safe deltas, leading spaces, stop strings held back and cut."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import SHARED_MODELS, STORIES
from engine.detokenizer import IncrementalDetokenizer
from engine.request import SamplingParams

TEXT = " café, 你好 🙂 — naïve “quotes” …\nnew line and the end"


@pytest.fixture(scope="module", params=[STORIES, SHARED_MODELS / "qwen2.5-tokenizer", SHARED_MODELS / "gpt2-tokenizer"],
                ids=["sentencepiece-byte-fallback", "qwen-byte-level", "gpt2-byte-level"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(request.param)


def stream(tokenizer, prompt: str, completion: str, **params):
    prompt_ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + completion)
    assert full[:len(prompt_ids)] == prompt_ids
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(**params))
    deltas = []
    for token in full[len(prompt_ids):]:
        detok.add_token(token)
        deltas.append(detok.take(False))
        if detok.stop_string:
            break
    deltas.append(detok.take(True))
    # What the completion adds to the prompt's text (keeps SentencePiece's leading space).
    decoded = tokenizer.decode(full, skip_special_tokens=True)[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)):]
    return deltas, detok, decoded


def test_deltas_never_split_characters_and_add_up(tokenizer):
    deltas, _, decoded = stream(tokenizer, "Hello there.", TEXT)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == decoded
    assert sum(1 for d in deltas if d) > 10  # it really streamed


def test_stop_string_spanning_tokens_is_cut_and_never_leaked(tokenizer):
    deltas, detok, _ = stream(tokenizer, "Hello there.", TEXT, stop=["the end", "你好 🙂"])
    assert detok.stop_string == "你好 🙂"
    assert "".join(deltas) == " café, "
    assert not any("你" in d for d in deltas)


def test_stop_string_kept_when_asked(tokenizer):
    deltas, _, _ = stream(tokenizer, "Hello there.", TEXT, stop=["naïve"], include_stop_str_in_output=True)
    assert "".join(deltas).endswith("naïve") and "quotes" not in "".join(deltas)
