"""Offline batch inference, as vLLM's ``LLM``: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import itertools
from typing import Sequence as Seq

from deltaserve.config import EngineConfig
from deltaserve.engine.llm_engine import LLMEngine
from deltaserve.engine.outputs import RequestOutput
from deltaserve.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """An engine plus a blocking ``generate``.

    ``model``: checkpoint directory (``None``: the built-in tiny Kimi-Linear checkpoint);
    ``engine_kwargs``: :class:`deltaserve.config.EngineConfig` fields (``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``num_kv_blocks``,
    ``num_state_slots``, ``enable_prefix_caching``, ``seed``, ``device``, ...).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", **engine_kwargs):
        self.llm_engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_kwargs))
        self._request_ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (see ``LLMEngine.shutdown``)."""
        self.llm_engine.shutdown()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_metrics(self) -> dict:
        return self.llm_engine.stats()

    def reset_prefix_cache(self) -> None:
        """Drop every cached checkpoint and KV block (see ``LLMEngine.reset_prefix_cache``)."""
        self.llm_engine.reset_prefix_cache()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order.

        ``prompts``: a string, a list of token ids, or a list of either. ``sampling_params``: one for
        all prompts or one per prompt (default ``SamplingParams()``).
        """
        prompts = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries but there are {len(prompts)} prompts"
                )
        engine = self.llm_engine
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._request_ids))
                engine.add_request(request_id, prompt, params)
                order[request_id] = i
        except ValueError:
            for request_id in order:
                engine.abort_request(request_id)
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(prompts), desc="Processed prompts", dynamic_ncols=True)
        try:
            while engine.has_unfinished_requests():
                outputs = engine.step()
                errors = {rid: exc for rid, exc in engine.pop_request_errors().items() if rid in order}
                if errors:
                    request_id, exc = next(iter(errors.items()))
                    raise RuntimeError(f"prompt {order[request_id]} failed: {type(exc).__name__}: {exc}") from exc
                for output in outputs:
                    if output.finished and output.request_id in order:
                        results[order[output.request_id]] = output
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            # NOTE: after an interrupt, leave no request of this call holding slots or blocks.
            for request_id in order:
                engine.abort_request(request_id)
        return results


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if len(prompts) == 0:
            return []
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return [list(p) if isinstance(p, tuple) else p for p in prompts]
    raise ValueError(f"prompts must be a str, a list of token ids, or a list of those; got {type(prompts).__name__}")
