"""What the engine calls: drafts for the next step, and the verification of a step's drafts.

``Speculator.propose(seqs)`` runs between steps and sets ``seq.spec_token_ids`` for sequences that
decode next; the scheduler gives such a sequence ``1 + len(spec_token_ids)`` tokens; the model
runner verifies them with :meth:`Speculator.verify` (the rejection sampler) and the scheduler
commits what was accepted. A sequence without drafts decodes one token as without speculation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from deltaserve.engine.sampler import SampledToken, Sampler
from deltaserve.spec_decode.config import SpeculativeConfig
from deltaserve.spec_decode.proposer import SyntheticAcceptance, make_proposer
from deltaserve.spec_decode.rejection_sampler import RejectionSampler


@dataclass
class SpecDecodeMetrics:
    """Cumulative counters, vLLM's names: verify rows with drafts (``num_drafts``), draft tokens
    proposed and accepted, accepted tokens per draft position, and steps without drafting."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_disabled_steps: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify row: ``1 + accepted / drafts`` (1.0 before any draft)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def as_stats(self) -> dict:
        out = {f"spec_decode_{k}": v for k, v in asdict(self).items() if k != "num_accepted_tokens_per_pos"}
        out["spec_decode_mean_acceptance_length"] = self.mean_acceptance_length
        for pos, count in enumerate(self.num_accepted_tokens_per_pos):
            out[f"spec_decode_num_accepted_tokens_pos_{pos}"] = count
        return out


class Speculator:
    """Proposer, rejection sampler and the switch that turns drafting off where it does not pay."""

    def __init__(self, config: SpeculativeConfig, sampler: Sampler, *, max_num_seqs: int, max_model_len: int, runner=None):
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.max_num_spec_seqs = config.max_num_spec_seqs or max_num_seqs
        self.max_model_len = max_model_len
        self.proposer = make_proposer(config, runner)
        self.rejection_sampler = RejectionSampler(sampler)
        self.synthetic = (
            SyntheticAcceptance(config.synthetic_acceptance_length, config.seed) if config.method == "synthetic" else None
        )
        self._recent_accepted: float | None = None  # accepted drafts per verify row, smoothed
        self._off_steps = 0
        self.reset_metrics()

    def reset_metrics(self) -> None:
        """Counters and the acceptance history back to their start (after the engine warm-up)."""
        self.metrics = SpecDecodeMetrics(num_accepted_tokens_per_pos=[0] * self.num_speculative_tokens)
        self._recent_accepted, self._off_steps = None, 0

    # ---- between steps -----------------------------------------------------------------------

    def propose(self, seqs, step=None, block_manager=None) -> None:
        """Set ``spec_token_ids`` of each running sequence that decodes next (others get none).

        ``step``: the runner's :class:`deltaserve.spec_decode.mtp.StepOutputs` of the step just run, for a
        proposer that observes every step (MTP), whether or not it drafts now; ``block_manager`` for one
        that writes a KV cache at the draft positions.
        """
        if step is not None and hasattr(self.proposer, "observe"):
            self.proposer.observe(step, block_manager)
        ready = []
        for seq in seqs:
            seq.spec_token_ids = []
            # NOTE: penalties, min_tokens and logit_bias adjust logits from the sequence's history, which
            # the rejection sampler does not replay per draft position: such sequences decode one by one.
            if (seq.finish_reason is None and seq.num_computed_tokens > 0 and seq.num_uncomputed_tokens == 1
                    and not seq.params.adjusts_logits):
                ready.append(seq)
        if not ready or not self._drafting_on(len(seqs)):
            return
        # NOTE: the verify scratch holds max_num_spec_seqs rows; the oldest sequences get them.
        ready = sorted(ready, key=lambda s: s.seq_id)[: self.max_num_spec_seqs]
        budgets = [
            # Each step emits up to 1 + k tokens: drafts past max_tokens or max_model_len are wasted.
            max(0, min(self.num_speculative_tokens, seq.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - seq.num_tokens))
            for seq in ready
        ]  # fmt: skip
        drafts = self.proposer.propose(ready, budgets)
        for seq, draft, budget in zip(ready, drafts, budgets):
            seq.spec_token_ids = list(draft[:budget])

    def paused(self, num_running: int) -> bool:
        """Whether the next step drafts nothing whatever the tokens (more running sequences than
        ``disable_by_batch_size``, or an auto-disable pause with steps left); no side effect. The
        engine may then pipeline that step (async scheduling) and :meth:`skip_step` it."""
        limit = self.config.disable_by_batch_size
        return (limit is not None and num_running > limit) or self._off_steps > 0

    def skip_step(self, num_running: int) -> None:
        """A step run without proposing (it was :meth:`paused`): the pause counts it as it counts a
        step whose proposal it refused."""
        self._drafting_on(num_running)

    def _drafting_on(self, num_running: int) -> bool:
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            self.metrics.num_disabled_steps += 1
            return False
        if self._off_steps > 0:
            self._off_steps -= 1
            self.metrics.num_disabled_steps += 1
            if self._off_steps == 0:
                self._recent_accepted = None  # probe: the next verify step decides afresh
            return False
        return True

    # ---- in a step ---------------------------------------------------------------------------

    def verify(
        self,
        logits: torch.Tensor,
        draft_token_ids: list[list[int]],
        params: list,
        generators: list[torch.Generator | None],
    ) -> list[list[SampledToken]]:
        """Rejection-sample one step's verify rows (``logits [sum(1 + k_i), V]``); updates the metrics."""
        forced = self.synthetic.num_accepted([len(d) for d in draft_token_ids]) if self.synthetic else None
        emitted = self.rejection_sampler(logits, draft_token_ids, params, generators, forced_num_accepted=forced)
        accepted = [len(tokens) - 1 for tokens in emitted]
        m = self.metrics
        m.num_drafts += len(draft_token_ids)
        m.num_draft_tokens += sum(len(d) for d in draft_token_ids)
        m.num_accepted_tokens += sum(accepted)
        for a in accepted:
            for pos in range(a):
                m.num_accepted_tokens_per_pos[pos] += 1
        self._observe(sum(accepted) / max(len(accepted), 1))
        return emitted

    def _observe(self, accepted_per_row: float) -> None:
        """Smooth the acceptance; below ``auto_disable_min_accepted`` drafting pauses for a while."""
        recent = self._recent_accepted
        recent = accepted_per_row if recent is None else 0.5 * recent + 0.5 * accepted_per_row
        self._recent_accepted = recent
        if self.config.auto_disable and recent < self.config.auto_disable_min_accepted:
            self._off_steps = self.config.auto_disable_probe_steps
