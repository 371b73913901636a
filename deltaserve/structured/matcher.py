"""One grammar matcher per sequence: the allowed next tokens, advanced with every accepted token."""

from __future__ import annotations

from typing import Any

import torch


class StructuredMatcher:
    """Wraps ``xgrammar.GrammarMatcher`` behind the four calls the engine needs.

    ``accept`` returns False for a token the grammar does not allow (the matcher is left unchanged).
    ``rollback(num_tokens)`` undoes the last accepted tokens (speculative decoding's rejected drafts).
    ``is_terminated``: the grammar is complete and a stop token (EOS) was accepted.
    """

    def __init__(self, compiled_grammar: Any):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled_grammar)
        self.num_accepted = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 ``[rows, ceil(V / 32)]``, CPU)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        ok = self._matcher.accept_token(token_id)
        self.num_accepted += ok
        return ok

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.num_accepted:
            raise ValueError(f"rollback: num_tokens must be in [0, {self.num_accepted}], got {num_tokens}")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    @property
    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()
