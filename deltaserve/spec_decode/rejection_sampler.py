"""Verification of drafts against the target model: the one place where drafts are accepted.

For each sequence the target's logits at its ``1 + k`` verify positions come in one block of rows:
row ``j`` predicts the token after position ``j`` (row 0: after the last sampled token, so it checks
draft 0). Temperature, top-k and top-p are applied to every row first (``Sampler.process_logits``),
so the distribution verified against is the one the sequence would sample from without drafts.

- Greedy rows: a draft is accepted while it equals the target's argmax; the first mismatch is
  replaced by the argmax (the tokens are exactly those of greedy decoding).
- Sampled rows: the standard rule (Leviathan et al. 2023; Chen et al. 2023): draft ``x`` with draft
  probability ``q(x)`` is accepted with probability ``min(1, p(x) / q(x))``; at the first rejection
  the token is drawn from ``norm(max(p - q, 0))``; when all ``k`` are accepted a bonus token is drawn
  from the last row. Every emitted token then follows the target distribution exactly. Deterministic
  drafters (n-gram, greedy MTP) have one-hot ``q``: accept with ``p(x)``, resample from ``p`` without ``x``.

Uniforms and the final draw come from the sequence's own generator when it has one (per-request
seeds), so a seeded sequence's tokens do not depend on its batch.
"""

from __future__ import annotations

import torch

from deltaserve.engine.sampler import SampledToken, Sampler
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.forward_context import host_to_device


class RejectionSampler:
    """``__call__(logits, draft_token_ids, params, generators)`` -> the tokens each sequence emits."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    @torch.inference_mode()
    def __call__(
        self,
        logits: torch.Tensor,
        draft_token_ids: list[list[int]],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        *,
        draft_probs: torch.Tensor | None = None,
        forced_num_accepted: list[int] | None = None,
    ) -> list[list[SampledToken]]:
        """Accepted drafts plus one target token per sequence (``1..1+k_i`` tokens each).

        ``logits [sum(1 + k_i), V]``: the rows of sequence ``i`` are consecutive. ``draft_probs``:
        ``[R, max k, V]`` draft distributions (None: one-hot at the drafts). ``forced_num_accepted``
        replaces the acceptance test (synthetic benchmarks; the rest of the path is unchanged).
        """
        num_rows = len(draft_token_ids)
        lengths = [1 + len(d) for d in draft_token_ids]
        if logits.dim() != 2 or logits.shape[0] != sum(lengths) or len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"logits must be [sum(1 + num_drafts) = {sum(lengths)}, V] with one params and generator per "
                f"sequence ({num_rows}); got {tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
            )
        device = logits.device
        logits = logits.float()
        row_params = [p for p, n in zip(params, lengths) for _ in range(n)]
        processed = Sampler.process_logits(logits, row_params)
        # NOTE: host lists reach the device without blocking (no wait for the forward still running); whether a
        # step samples at all is decided on them too, so the step's one sync is reading its results.
        all_greedy = all(p.is_greedy for p in params)
        probs = None if all_greedy else torch.softmax(processed, dim=-1)  # [N, V]
        greedy = host_to_device([p.is_greedy for p in params], device, torch.bool)

        max_k = max(lengths) - 1
        start_list = [0]
        for n in lengths[:-1]:
            start_list.append(start_list[-1] + n)
        starts = host_to_device(start_list, device)
        num_drafts = host_to_device([n - 1 for n in lengths], device)
        drafts = host_to_device([d + [0] * (max_k - len(d)) for d in draft_token_ids], device).reshape(num_rows, max_k)
        offsets = torch.arange(max_k, device=device)
        valid = offsets[None, :] < num_drafts[:, None]  # [R, K]
        positions = (starts[:, None] + offsets[None, :]).clamp(max=logits.shape[0] - 1)  # [R, K]

        if forced_num_accepted is not None:
            num_accepted = host_to_device(forced_num_accepted, device).clamp(max=num_drafts)
        else:
            accepted = logits.argmax(dim=-1)[positions] == drafts  # greedy acceptance
            if not all_greedy:
                target_p = probs[positions, drafts]  # [R, K]
                draft_q = (torch.ones_like(target_p) if draft_probs is None
                           else draft_probs.gather(2, drafts[..., None])[..., 0])  # fmt: skip
                uniforms = self._uniforms(num_rows, max_k, params, generators, device)
                accepted = torch.where(greedy[:, None], accepted, uniforms * draft_q < target_p)
            num_accepted = (accepted & valid).int().cumprod(dim=1).sum(dim=1)  # leading accepted drafts

        final_rows = starts + num_accepted  # [R]: the row that draws the emitted target token
        token_ids = logits[final_rows].argmax(dim=-1)
        if not all_greedy:
            final = probs[final_rows]  # [R, V]
            if forced_num_accepted is None and max_k:
                rejected = num_accepted < num_drafts
                if draft_probs is None:
                    rejected_draft = drafts.gather(1, num_accepted.clamp(max=max_k - 1)[:, None])
                    residual = final.scatter(1, rejected_draft, 0.0)
                else:
                    index = num_accepted.clamp(max=max_k - 1)
                    q = draft_probs[torch.arange(num_rows, device=device), index]  # [R, V]
                    residual = (final - q).clamp(min=0.0)
                # NOTE: p == q leaves no residual mass; that rejection then has probability 0, any draw is fine.
                ok = residual.sum(dim=-1, keepdim=True) > 0
                final = torch.where(rejected[:, None] & ok, residual, final)
            sampled = (final / self.sampler.exponential_noise(final, generators)).argmax(dim=-1)
            token_ids = torch.where(greedy, token_ids, sampled)

        # Emitted tokens of row i: its first a_i drafts, then the target token (positions a_i + 1.. unused).
        slots = torch.arange(max_k + 1, device=device)
        emitted = torch.where(slots[None, :] < num_accepted[:, None], torch.nn.functional.pad(drafts, (0, 1)),
                              token_ids[:, None])  # [R, K+1]  # fmt: skip
        if any(p.logprobs is not None for p in params):
            accepted_list, token_list = torch.stack([num_accepted, token_ids]).tolist()
            return self._outputs(processed, start_list, accepted_list, token_list, draft_token_ids, params)
        # Logprobs from each emitted token's own row (greedy rows: the raw logits, as in Sampler).
        rows = (starts[:, None] + slots[None, :]).clamp(max=logits.shape[0] - 1)  # [R, K+1]
        chosen = torch.log_softmax(processed, dim=-1)[rows, emitted]  # [R, K+1]
        # NOTE: one device-to-host copy for the step: counts and token ids are exact in float64.
        host = torch.cat([num_accepted[:, None].double(), emitted.double(), chosen.double()], dim=1).tolist()
        result = []
        for row in host:
            a = int(row[0])
            tokens, logprobs = row[1 : a + 2], row[max_k + 2 : max_k + a + 3]
            result.append([SampledToken(int(t), lp, None) for t, lp in zip(tokens, logprobs)])
        return result

    @staticmethod
    def _outputs(processed, start_list, accepted_list, token_list, draft_token_ids, params) -> list[list[SampledToken]]:
        """The emitted tokens with their logprobs and the top alternatives asked for (``Sampler.outputs``)."""
        out_rows, out_tokens, out_params, counts = [], [], [], []
        for i, (a, drafts_i) in enumerate(zip(accepted_list, draft_token_ids)):
            out_rows.extend(range(start_list[i], start_list[i] + a + 1))
            out_tokens.extend(drafts_i[:a] + [token_list[i]])
            out_params.extend([params[i]] * (a + 1))
            counts.append(a + 1)
        device = processed.device
        rows, tokens = host_to_device(out_rows, device), host_to_device(out_tokens, device)
        emitted = Sampler.outputs(processed[rows], tokens, out_params)
        result, at = [], 0
        for n in counts:
            result.append(emitted[at : at + n])
            at += n
        return result

    def _uniforms(self, num_rows: int, max_k: int, params, generators, device) -> torch.Tensor:
        """``U[0, 1)`` ``[R, K]``: seeded sampled rows from their own generator, the others from the shared one."""
        uniforms = torch.rand((num_rows, max_k), device=device, generator=self.sampler.generator)
        for row, (p, generator) in enumerate(zip(params, generators)):
            if generator is not None and not p.is_greedy and max_k:
                uniforms[row] = torch.rand(max_k, device=device, generator=generator)
        return uniforms
