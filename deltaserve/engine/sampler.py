"""Sampling of one token per row, vectorised over the batch (the transformations: ``logits_processors``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from deltaserve.engine.logits_processors import (
    SamplingTensors,
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_temperature,
    apply_top_k_top_p,
)
from deltaserve.engine.outputs import Logprob
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.forward_context import host_to_device
from deltaserve.ops.sampling import greedy_sample
from deltaserve.structured.logits import apply_structured_outputs


class SampledToken(NamedTuple):
    """One row's result: the token, its logprob, and the top alternatives (``None`` if not asked)."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, Logprob] | None


class Sampler:
    """Samples with per-row settings; rows without their own generator share ``generator``.

    Logprobs come from ``log_softmax`` in float32 of the processed logits (``min_tokens``,
    ``logit_bias``, penalties, then temperature, ``min_p``, top-k, top-p); greedy rows (temperature
    0 or top-k 1) take the argmax after the first three and skip the rest; a batch of greedy rows only,
    none asking for top logprobs, takes token and logprob in one pass (``ops.sampling.greedy_sample``).
    ``eos_token_ids`` are the tokens ``min_tokens`` holds back (with each row's ``stop_token_ids``).
    """

    def __init__(self, generator: torch.Generator | None = None, eos_token_ids: set[int] | None = None):
        self.generator = generator
        self.eos_token_ids = set(eos_token_ids or ())

    def __call__(self, *args, **kwargs) -> list[SampledToken]:
        """:meth:`sample`, waiting for the result on the host."""
        return self.sample(*args, **kwargs).tokens()

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        structured: list | None = None,
        histories: list[Any] | None = None,
    ) -> "DeviceSample":
        """``logits``: ``[S, V]``; ``params`` and ``generators``: one per row. Does not modify ``logits``.
        Queues the work and returns without waiting for the device (see :class:`DeviceSample`).

        ``structured``: per row a ``StructuredMatcher`` or None; constrained rows sample only what
        their grammar allows (greedy, sampled and logprobs alike), the other rows are untouched.
        ``histories``: per row its ``Sequence`` (for penalties and ``min_tokens``), or None.
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(generators) != len(params):
            raise ValueError(
                f"logits must be [S, V] with S = len(params) = len(generators); got {tuple(logits.shape)}, "
                f"{len(params)} params, {len(generators)} generators"
            )
        device = logits.device
        tensors = SamplingTensors.build(params, histories, self.eos_token_ids, logits.shape[1], device)
        adjusted = self.adjust_logits(apply_structured_outputs(logits.float(), structured), tensors)
        if all(p.is_greedy and p.logprobs is None for p in params):
            # NOTE: the token and its logprob are all that is read back: one pass over the rows.
            token_ids, chosen = greedy_sample(adjusted)
            return DeviceSample(token_ids, chosen, None, [None] * len(params))
        processed = self.process_logits(adjusted, params)

        token_ids = adjusted.argmax(dim=-1)
        if not all(p.is_greedy for p in params):
            probs = torch.softmax(processed, dim=-1)
            greedy = host_to_device([p.is_greedy for p in params], device, torch.bool)
            token_ids = torch.where(greedy, token_ids, (probs / self.exponential_noise(probs, generators)).argmax(dim=-1))

        return DeviceSample.of(processed, token_ids, params)

    def exponential_noise(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """``E ~ Exp(1)`` shaped as ``probs [S, V]``: ``argmax(probs / E)`` is a draw from each row.

        NOTE: the exponential race; each seeded row draws its own ``E`` from its generator, so its
        tokens do not depend on the rest of the batch.
        """
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        return noise

    @staticmethod
    def outputs(processed: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> list[SampledToken]:
        """Each row's chosen token with its logprob (and top logprobs where asked) from ``processed [S, V]``."""
        return DeviceSample.of(processed, token_ids, params).tokens()

    @staticmethod
    def adjust_logits(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
        """What changes greedy decoding too: ``min_tokens``, ``logit_bias``, penalties."""
        logits = apply_min_tokens(logits, tensors.min_tokens_mask)
        logits = apply_logit_bias(logits, tensors.logit_bias)
        return apply_penalties(logits, tensors)

    @staticmethod
    def process_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Temperature, ``min_p``, top-k, top-p on sampling rows; masked logits become ``-inf``."""
        sampling = [not p.is_greedy for p in params]
        if not any(sampling):
            return logits  # NOTE: what the ops below leave of greedy rows (x / 1.0 is x), without the copy
        vocab = logits.shape[-1]
        device = logits.device

        def per_row(values: list[float], dtype=torch.float32) -> torch.Tensor:
            return host_to_device(values, device, dtype)

        processed = apply_temperature(logits, per_row([float(p.temperature) if s else 1.0
                                                       for p, s in zip(params, sampling)]))
        # NOTE: whether a transformation is used at all is decided here, on host lists (no device sync).
        min_p = [float(p.min_p) if s else 0.0 for p, s in zip(params, sampling)]
        processed = apply_min_p(processed, per_row(min_p) if any(m > 0 for m in min_p) else None)
        top_k = [min(p.effective_top_k, vocab) if s and p.effective_top_k > 0 else vocab
                 for p, s in zip(params, sampling)]
        top_p = [float(p.top_p) if s else 1.0 for p, s in zip(params, sampling)]
        return apply_top_k_top_p(processed, per_row(top_k, torch.int64) if any(k < vocab for k in top_k) else None,
                                 per_row(top_p) if any(p < 1.0 for p in top_p) else None)


def top_logprob_entries(
    logprobs: torch.Tensor, token_ids: torch.Tensor, want: list[int | None]
) -> list[dict[int, Logprob] | None]:
    """Per row asking ``k``: the given token's ``Logprob`` (with its rank) plus the ``k`` best, else None.

    ``logprobs``: ``[R, V]``; ``token_ids``: ``[R]`` (the sampled token, or a prompt token).
    """
    tensors = top_logprob_tensors(logprobs, token_ids, want)
    if tensors is None:
        return [None] * logprobs.shape[0]
    chosen, ranks, top_values, top_ids = (t.tolist() if t is not None else None for t in tensors)
    return top_logprob_dicts(chosen, ranks, top_values, top_ids, token_ids.tolist(), want)


def top_logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, want: list[int | None]) -> tuple | None:
    """The device half of :func:`top_logprob_entries`: ``(chosen [R], ranks [R], top values [R, k], top ids
    [R, k])`` (the last two None when no row asks for alternatives), or None when no row asks."""
    if not any(k is not None for k in want):
        return None
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]
    ranks = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    k_max = max(k for k in want if k is not None)
    top_values, top_ids = logprobs.topk(min(k_max, logprobs.shape[1]), dim=-1) if k_max > 0 else (None, None)
    return chosen, ranks, top_values, top_ids


def top_logprob_dicts(chosen_list: list[float], ranks: list[int], top_values: list | None, top_ids: list | None,
                      token_list: list[int], want: list[int | None]) -> list[dict[int, Logprob] | None]:
    """The host half of :func:`top_logprob_entries`, from the host lists of :func:`top_logprob_tensors`."""
    tops: list[dict[int, Logprob] | None] = [None] * len(want)
    for row, k in enumerate(want):
        if k is None:
            continue
        entry = {token_list[row]: Logprob(chosen_list[row], ranks[row])}
        for rank in range(k):
            token = top_ids[row][rank]
            if token not in entry:
                entry[token] = Logprob(top_values[row][rank], rank + 1)
        tops[row] = entry
    return tops


class DeviceSample:
    """Sampled rows still on the device: ``tokens()`` waits for them and builds the ``SampledToken`` list.

    ``token_ids`` ``[S]`` int64 stays on the device, so a next step can take its input ids from it
    without a host round trip (async scheduling). ``start_copy()`` queues the copies to host
    memory right away (on CUDA: pinned, non-blocking, an event behind them), so ``tokens()`` waits
    for this step only, not for work queued after it.
    """

    def __init__(self, token_ids: torch.Tensor, chosen: torch.Tensor, tops: tuple | None, want: list[int | None]):
        self.token_ids = token_ids
        self.want = want
        self._tensors = (token_ids, chosen, *(tops[1:] if tops is not None else ()))
        self._host: tuple | None = None
        self._event = None

    @classmethod
    def of(cls, processed: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> "DeviceSample":
        """Each row's chosen token with its logprob (and top logprobs where asked) from ``processed [S, V]``."""
        logprobs = torch.log_softmax(processed, dim=-1)
        want = [p.logprobs for p in params]
        tops = top_logprob_tensors(logprobs, token_ids, want)
        chosen = tops[0] if tops is not None else logprobs.gather(1, token_ids[:, None])[:, 0]
        return cls(token_ids, chosen, tops, want)

    def start_copy(self) -> "DeviceSample":
        """Queue the device-to-host copies now (a no-op on the CPU); returns self."""
        if self._host is None and self.token_ids.device.type == "cuda":
            self._host = tuple(t.to("cpu", non_blocking=True) if t is not None else None for t in self._tensors)
            self._event = torch.cuda.Event()
            self._event.record()
        return self

    def tokens(self) -> list[SampledToken]:
        """The host result, one ``SampledToken`` per row (waits for the device)."""
        if self._event is not None:
            self._event.synchronize()
        host = self._host if self._host is not None else self._tensors
        token_list, chosen, *rest = (t.tolist() if t is not None else None for t in host)
        tops = [None] * len(token_list)
        if rest:
            ranks, top_values, top_ids = rest
            tops = top_logprob_dicts(chosen, ranks, top_values, top_ids, token_list, self.want)
        return [SampledToken(t, lp, top) for t, lp, top in zip(token_list, chosen, tops)]
