"""Incremental detokenisation and stop criteria (EOS, stop token ids, stop strings, length)."""

from __future__ import annotations

from deltaserve.engine.sequence import Sequence

# NOTE: tokens of the prompt decoded as left context of the first output tokens, so that a
# word-initial space (sentencepiece's "▁") comes out as it does in the full text.
PREFIX_CONTEXT_TOKENS = 5


class StopChecker:
    """Called once per sampled token: extends ``seq.output_text`` and sets ``seq.finish_reason``.

    - EOS (unless ``ignore_eos``) and ``stop_token_ids`` end the sequence with ``"stop"``; their
      token stays in ``token_ids`` but adds no text. ``stop_reason`` is the stop token id (None for EOS).
    - A stop string ends it with ``"stop"``; the text is cut before the string (after it with
      ``include_stop_str_in_output``); ``token_ids`` keep the token that completed it.
    - ``max_tokens`` (already clipped to ``max_model_len``) ends it with ``"length"``.
    - A grammar (``structured_outputs``) that has ended ends it with ``"stop"``; a token the grammar
      refused (never sampled under the mask) ends it with ``"abort"``, its ``stop_reason`` saying why.
    """

    def __init__(self, tokenizer, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, seq: Sequence) -> None:
        params = seq.params
        token = seq.token_ids[-1]
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif seq.structured_rejected_token is not None:
            seq.finish_reason = "abort"
            seq.stop_reason = f"structured_outputs: token {seq.structured_rejected_token} is not allowed by the grammar"
        elif seq.structured is not None and seq.structured.is_terminated:
            seq.finish_reason, seq.stop_reason = "stop", None
        if seq.finish_reason is not None:
            # The stop token adds no text; bytes held back before it are emitted as they are.
            self.decode_new_text(seq, end=seq.num_tokens - 1, final=True)
            return
        new_text = self.decode_new_text(seq)
        # NOTE: stop strings count from min_tokens on (EOS and stop token ids are masked until then).
        if new_text and params.stop and seq.num_output_tokens >= params.min_tokens:
            self._check_stop_strings(seq, len(new_text))
            if seq.finish_reason is not None:
                return
        if seq.num_output_tokens >= seq.max_tokens:
            seq.finish_reason = "length"
            self.decode_new_text(seq, final=True)

    def decode_new_text(self, seq: Sequence, end: int | None = None, final: bool = False) -> str:
        """Append the text of ``token_ids[:end]`` not yet decoded to ``seq.output_text``; returns it.

        Unless ``final``, text that ends in an incomplete multi-byte character waits for more tokens.
        """
        if self.tokenizer is None:
            return ""
        if seq.read_offset == 0:
            seq.read_offset = seq.num_prompt_tokens
            seq.prefix_offset = max(0, seq.num_prompt_tokens - PREFIX_CONTEXT_TOKENS)
        end = seq.num_tokens if end is None else end
        if end <= seq.read_offset:
            return ""
        skip = seq.params.skip_special_tokens
        tokens = seq.token_ids
        prefix_text = self.tokenizer.decode(tokens[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(tokens[seq.prefix_offset : end], skip_special_tokens=skip)
        # NOTE: a trailing U+FFFD means a multi-byte character is still incomplete: wait for more tokens.
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        new_text = full_text[len(prefix_text) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, end
        seq.output_text += new_text
        return new_text

    @staticmethod
    def _check_stop_strings(seq: Sequence, num_new_chars: int) -> None:
        text = seq.output_text
        best = None
        for stop in seq.params.stop:
            # Only where the new characters could complete the string.
            start = max(0, len(text) - num_new_chars - len(stop) + 1)
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return
        index, stop = best
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.output_text = text[:end]
        seq.finish_reason, seq.stop_reason = "stop", stop


def visible_text(seq: Sequence) -> str:
    """Text safe to show while ``seq`` runs: holds back a tail that may still become a stop string."""
    text = seq.output_text
    if seq.finish_reason is not None or not seq.params.stop:
        return text
    hold = 0
    for stop in seq.params.stop:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return text[: len(text) - hold]
