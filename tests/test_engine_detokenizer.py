"""Incremental detokenisation and stop checks vs decoding the whole output at once."""

from __future__ import annotations

import random

import pytest

from deltaserve.engine.detokenizer import StopChecker, visible_text
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.engine.sequence import Sequence
from deltaserve.models.tiny import make_tokenizer

EOS = 257


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def feed(
    checker: StopChecker, prompt: list[int], outputs: list[int], params: SamplingParams
) -> tuple[Sequence, list[str]]:
    """Append tokens one by one as the engine does; returns the sequence and the visible text after each."""
    seq = Sequence(0, "r", 0, prompt, params, max_tokens=params.max_tokens)
    shown = []
    for token in outputs:
        seq.append_token(token, 0.0, None)
        checker(seq)
        shown.append(visible_text(seq))
        if seq.finish_reason is not None:
            break
    return seq, shown


def test_incremental_text_equals_decoding_everything_with_multibyte_characters(tokenizer):
    rng = random.Random(0)
    text = "héllo wörld ✓ 日本語 🙂 end"
    checker = StopChecker(tokenizer, {EOS})
    for trial in range(20):
        # Real UTF-8 mixed with stray continuation bytes, cut at random token boundaries.
        data = list(text.encode()) + [rng.randrange(128, 256) for _ in range(trial % 4)]
        if trial % 5 == 4:
            rng.shuffle(data)
        seq, shown = feed(checker, [65, 66], data, SamplingParams(max_tokens=len(data)))
        assert seq.finish_reason == "length"
        assert seq.output_text == tokenizer.decode(data)
        for earlier, later in zip(shown, shown[1:]):
            assert later.startswith(earlier)  # streamed text only grows


def test_eos_adds_no_text_and_flushes_held_bytes(tokenizer):
    checker = StopChecker(tokenizer, {EOS})
    seq, _ = feed(checker, [65], [72, 0xC3, EOS, 73], SamplingParams(max_tokens=10))
    assert seq.output_token_ids == [72, 0xC3, EOS]
    assert (seq.finish_reason, seq.stop_reason) == ("stop", None)
    assert seq.output_text == tokenizer.decode([72, 0xC3])


def test_stop_string_spanning_tokens_is_held_back_while_streaming(tokenizer):
    checker = StopChecker(tokenizer, {EOS})
    data = list(b"abc STOP tail")
    seq, shown = feed(checker, [65], data, SamplingParams(max_tokens=20, stop="STOP"))
    assert seq.output_text == "abc " and seq.stop_reason == "STOP"
    assert seq.output_token_ids == list(b"abc STOP")
    assert all(not s.endswith(("S", "ST", "STO")) for s in shown[:-1])


def test_earliest_of_several_stop_strings_wins(tokenizer):
    checker = StopChecker(tokenizer, {EOS})
    seq, _ = feed(checker, [65], list(b"xxABCD"), SamplingParams(max_tokens=20, stop=["BCD", "AB"]))
    assert seq.output_text == "xx" and seq.stop_reason == "AB"


def test_without_tokenizer_only_token_stops_apply():
    checker = StopChecker(None, {EOS})
    seq, _ = feed(checker, [1], [5, 6, 7], SamplingParams(max_tokens=3, stop="x", stop_token_ids=[9]))
    assert seq.output_text == "" and seq.finish_reason == "length"
    seq, _ = feed(checker, [1], [5, 9, 7], SamplingParams(max_tokens=3, stop_token_ids=[9]))
    assert seq.output_token_ids == [5, 9] and seq.stop_reason == 9
