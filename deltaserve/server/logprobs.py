"""Logprobs in OpenAI's completion shape: token texts, distinct ``top_logprobs`` keys, text offsets,
and the echoed prompt's entries (``echo`` with ``logprobs``)."""

from __future__ import annotations

import math
from typing import Any

from deltaserve.server.protocol import CompletionLogprobs


def finite_logprob(logprob: float | None) -> float:
    # NOTE: top-k / top-p mask tokens to -inf, which JSON cannot carry; OpenAI writes -9999.0 there.
    return logprob if logprob is not None and math.isfinite(logprob) else -9999.0


def token_text(token_id: int, logprob: Any, tokenizer: Any) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    # NOTE: vLLM's spelling for a token that cannot be decoded (no tokenizer).
    return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"


def distinct_top_logprobs(pairs: list[tuple[int, str, float]]) -> dict[str, float]:
    """``{text: logprob}`` keeping every token: one whose text is already a key (two byte tokens
    both shown as U+FFFD) is keyed ``token_id:<id>`` (vLLM's spelling), so k tokens stay k entries."""
    out: dict[str, float] = {}
    seen: set[int] = set()
    for token_id, text, logprob in pairs:
        if token_id not in seen:
            seen.add(token_id)
            out[text if text not in out else f"token_id:{token_id}"] = logprob
    return out


def token_entry(token_id: int, candidates: dict, tokenizer: Any, top: int) -> tuple[str, float, list[tuple[int, str, float]]]:
    """``(token text, logprob, [(id, text, logprob)] of the top ``top`` best first)`` at one position."""
    chosen = candidates.get(token_id)
    alternatives = sorted(candidates.items(), key=lambda item: item[1].rank)[:top]
    return (token_text(token_id, chosen, tokenizer), finite_logprob(chosen.logprob if chosen is not None else None),
            [(tid, token_text(tid, lp, tokenizer), finite_logprob(lp.logprob)) for tid, lp in alternatives])


def text_offsets(tokenizer: Any, token_ids: list[int], text_len: int) -> list[int]:
    """Where each token's text starts in the decoded text (incrementally, two small decodes a token),
    clipped to ``text_len``; a token that completes a multi-byte character shares its start."""
    offsets, length, prefix, read = [], 0, 0, 0
    for i in range(len(token_ids)):
        offsets.append(min(length, text_len))
        if tokenizer is None:
            continue
        prefix_text = tokenizer.decode(token_ids[prefix:read])
        full_text = tokenizer.decode(token_ids[prefix : i + 1])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            length += len(full_text) - len(prefix_text)
            prefix, read = read, i + 1
    return offsets


class EchoPrompt:
    """What ``echo`` puts before a choice: the prompt's text and, with logprobs, its tokens' entries."""

    def __init__(self, text: str, token_ids: list[int]):
        self.text, self.token_ids = text, token_ids

    def logprobs(self, output: Any, tokenizer: Any, top: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        entries = output.prompt_logprobs or [None] * len(self.token_ids)
        offsets = text_offsets(tokenizer, self.token_ids, len(self.text))
        for position, (token_id, candidates) in enumerate(zip(self.token_ids, entries)):
            if candidates is None:
                result.tokens.append(token_text(token_id, None, tokenizer))
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                text, logprob, alternatives = token_entry(token_id, candidates, tokenizer, top)
                result.tokens.append(text)
                result.token_logprobs.append(logprob)
                result.top_logprobs.append(distinct_top_logprobs(alternatives + [(token_id, text, logprob)]))
            result.text_offset.append(offsets[position])
        return result


def prompt_logprobs_body(output: Any) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's ``prompt_logprobs`` shape: per prompt token ``{token_id: {logprob, rank, decoded_token}}``."""
    if output.prompt_logprobs is None:
        return None
    return [None if entry is None else {
        str(token_id): {"logprob": finite_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
        for token_id, lp in entry.items()} for entry in output.prompt_logprobs]
