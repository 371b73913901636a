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
        probs = torch.softmax(processed, dim=-1)  # [N, V]
        greedy = torch.tensor([p.is_greedy for p in params], device=device)

        max_k = max(lengths) - 1
        start_list = [0]
        for n in lengths[:-1]:
            start_list.append(start_list[-1] + n)
        starts = torch.tensor(start_list, device=device)
        num_drafts = torch.tensor([n - 1 for n in lengths], device=device)
        drafts = torch.tensor([d + [0] * (max_k - len(d)) for d in draft_token_ids], dtype=torch.long, device=device)
        drafts = drafts.reshape(num_rows, max_k)
        offsets = torch.arange(max_k, device=device)
        valid = offsets[None, :] < num_drafts[:, None]  # [R, K]
        positions = (starts[:, None] + offsets[None, :]).clamp(max=logits.shape[0] - 1)  # [R, K]

        if forced_num_accepted is not None:
            num_accepted = torch.tensor(forced_num_accepted, device=device).clamp(max=num_drafts)
        else:
            matches = logits.argmax(dim=-1)[positions] == drafts  # greedy acceptance
            target_p = probs[positions, drafts]  # [R, K]
            draft_q = torch.ones_like(target_p) if draft_probs is None else draft_probs.gather(2, drafts[..., None])[..., 0]
            uniforms = self._uniforms(num_rows, max_k, params, generators, device)
            accepted = torch.where(greedy[:, None], matches, uniforms * draft_q < target_p) & valid
            num_accepted = accepted.int().cumprod(dim=1).sum(dim=1)  # leading accepted drafts

        final_rows = starts + num_accepted  # [R]: the row that draws the emitted target token
        final = probs[final_rows]  # [R, V]
        rejected = num_accepted < num_drafts
        if forced_num_accepted is None and bool(rejected.any()):
            rejected_draft = drafts.gather(1, num_accepted.clamp(max=max(max_k - 1, 0))[:, None]) if max_k else None
            if draft_probs is None:
                residual = final.scatter(1, rejected_draft, 0.0)
            else:
                index = num_accepted.clamp(max=max_k - 1)
                q = draft_probs[torch.arange(num_rows, device=device), index]  # [R, V]
                residual = (final - q).clamp(min=0.0)
            # NOTE: p == q leaves no residual mass; that rejection then has probability 0, any draw is fine.
            ok = residual.sum(dim=-1, keepdim=True) > 0
            final = torch.where(rejected[:, None] & ok, residual, final)
        sampled = (final / self.sampler.exponential_noise(final, generators)).argmax(dim=-1)
        token_ids = torch.where(greedy, logits[final_rows].argmax(dim=-1), sampled)

        # Emitted tokens: the accepted drafts, then the target token; logprobs from their own rows.
        accepted_list, token_list = num_accepted.tolist(), token_ids.tolist()
        out_rows, out_tokens, out_params, counts = [], [], [], []
        for i, (a, drafts_i) in enumerate(zip(accepted_list, draft_token_ids)):
            out_rows.extend(range(start_list[i], start_list[i] + a + 1))
            out_tokens.extend(drafts_i[:a] + [token_list[i]])
            out_params.extend([params[i]] * (a + 1))
            counts.append(a + 1)
        rows = torch.tensor(out_rows, device=device)
        tokens = torch.tensor(out_tokens, dtype=torch.long, device=device)
        # NOTE: greedy rows' logprobs come from the raw logits, as in Sampler (process_logits is the identity there).
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
