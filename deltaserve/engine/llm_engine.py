"""The engine loop: requests in, one scheduled forward per ``step()``, cumulative outputs out.

Single-threaded: a server calls ``add_request`` / ``abort_request`` / ``step`` from one thread
(or under one lock).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from deltaserve.config import EngineConfig
from deltaserve.distributed.executor import start_executor
from deltaserve.distributed.worker import build_runner
from deltaserve.engine.async_step import AsyncScheduler, async_scheduling_enabled
from deltaserve.engine.detokenizer import StopChecker, visible_text
from deltaserve.engine.metrics import EngineMetrics
from deltaserve.engine.kv_hooks import PrefilledPrompt, admit_prefilled, check_prefilled
from deltaserve.engine.prefix_hooks import NoPrefixCache
from deltaserve.engine.model_runner import checkpoints_in_forward
from deltaserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from deltaserve.engine.sampling_params import SamplingParams
from deltaserve.engine.scheduler import Scheduler
from deltaserve.engine.warmup import run_warmup
from deltaserve.engine.sequence import Sequence
from deltaserve.kv.block_manager import BlockManager
from deltaserve.kv.prefix_cache import PrefixCache
from deltaserve.ops.delta_rule import CHUNK_SIZE
from deltaserve.structured import GrammarCompiler, StructuredMatcher, StructuredOutputsParams

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model", "vocab.json")


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """transformers' tokenizer of a checkpoint directory, or None when it ships none."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many kinds for a broken file
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"the tokenizer in {path} cannot be loaded: {type(exc).__name__}: {detail}") from exc


def eos_token_ids(hf_config, tokenizer) -> set[int]:
    """EOS ids from the model config (an int or a list) and the tokenizer."""
    ids: set[int] = set()
    eos = getattr(hf_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _check_device(device: str) -> None:
    """ValueError naming ``device`` for a string torch cannot parse or a CUDA device this torch lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s) visible to torch")


class LLMEngine:
    """``add_request`` / ``step`` / ``abort_request`` over a scheduler and a model runner."""

    def __init__(self, config: EngineConfig | None = None, **kwargs):
        from deltaserve.models.loader import load_model_config

        config = config if config is not None else EngineConfig(**kwargs)
        if config.model is None:
            from deltaserve.models.tiny import default_tiny_model

            config = dataclasses.replace(config, model=str(default_tiny_model()))
        _check_device(config.device)
        # NOTE: the text model's config (a vision-language checkpoint nests it as text_config).
        self.hf_config = load_model_config(config.model).get_text_config()
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
        # Tensor parallelism: the workers start first and load their shards while rank 0 loads its own.
        self.executor = start_executor(config, self.hf_config)  # None at TP 1
        if self.executor is not None:
            weakref.finalize(self, self.executor.shutdown)
        eos_ids = eos_token_ids(self.hf_config, self.tokenizer)
        try:
            generator = torch.Generator(device=config.device).manual_seed(config.seed)
            step_sender = self.executor.send_step if self.executor is not None else None
            self.runner = build_runner(config, self.hf_config, generator, eos_ids, step_sender=step_sender)
        except Exception:
            if self.executor is not None:
                self.executor.shutdown()
            raise
        self.config = self.runner.config
        self.block_manager = BlockManager(self.config.num_kv_blocks, self.config.block_size)
        self.stop_checker = StopChecker(self.tokenizer, eos_ids)
        self.prefix_cache = None
        if self.config.enable_prefix_caching:
            self.prefix_cache = PrefixCache(
                self.block_manager,
                self.runner.state_pool,
                self.runner.kv_cache,
                checkpoint_interval=self.config.checkpoint_interval,
                budget_bytes=self.config.prefix_cache_budget_bytes,
                capture_grid=CHUNK_SIZE if checkpoints_in_forward(self.config) else None,
                cache_ops=self.runner.cache_ops,
            )
            logger.info(self.prefix_cache.describe())
        self.scheduler = Scheduler(
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            state_pool=self.runner.state_pool,
            block_manager=self.block_manager,
            check_stop=self._check_stop,
            prefix_cache=self.prefix_cache,
        )
        self.metrics = EngineMetrics()
        # Async scheduling: one step in flight while the host postprocesses the previous one (None: synchronous).
        self.async_scheduler = None
        self._drafts_decided = True  # NOTE: the next step's drafts are proposed (see step())
        if async_scheduling_enabled(self.config):
            self.async_scheduler = AsyncScheduler(self.scheduler, self.runner, lambda: self.metrics, self.stats)
        self.requests: dict[str, _Request] = {}
        # Requests that failed alone in a step (see _check_stop), until pop_request_errors().
        self._request_errors: dict[str, BaseException] = {}
        self._seq_ids = itertools.count()
        # Prefilled requests whose first token (sampled by the prefill instance) is not reported yet.
        self._arrived: list[str] = []
        self._grammar_compiler = None
        self._grammar_lock = threading.Lock()
        # NOTE: on the GPU by default: Triton compiles and autotunes fla's prefill kernels on the
        # first shapes it sees (about 20 s on an H200), which would otherwise hit the first request.
        if self.config.extra.get("warmup", self.runner.device.type == "cuda"):
            self.warmup()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int] | PrefilledPrompt, params: SamplingParams) -> None:
        """Queue a request; ValueError (and nothing queued) on a bad id, prompt or params.

        A :class:`PrefilledPrompt` (computed by a prefill instance) starts as a decode: its slot and
        blocks are the engine's from here on, freed here if the request is refused.
        """
        if isinstance(prompt, PrefilledPrompt):
            try:
                self._add(request_id, prompt.token_ids, params, prompt)
            except BaseException:
                self.scheduler.state_pool.free([prompt.state_slot])
                self.block_manager.release(list(reversed(prompt.block_ids)))
                raise
        else:
            self._add(request_id, prompt, params, None)

    def _add(self, request_id: str, prompt, params: SamplingParams, prefilled: PrefilledPrompt | None) -> None:
        if not isinstance(request_id, str):
            raise ValueError(f"request_id must be a str, got {type(request_id).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        vocab = self.hf_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token ids must be in [0, {vocab}) (vocab_size); found {bad[:8]}")
        max_len = self.config.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but max_model_len is {max_len}: a prompt must be "
                f"shorter than max_model_len to leave room for output"
            )
        room = max_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        if prefilled is not None:
            check_prefilled(prefilled, params, self.block_manager)
        grammar = self.compile_grammar(params.structured_outputs) if params.structured_outputs is not None else None
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                # NOTE: modulo 2**64, the generator's seed range (a seed near the top must not overflow).
                generator = torch.Generator(device=self.runner.device).manual_seed((params.seed + index) % 2**64)
            seqs.append(Sequence(next(self._seq_ids), request_id, index, token_ids, params, max_tokens, generator))
            if grammar is not None:
                seqs[-1].structured = StructuredMatcher(grammar)
        self.requests[request_id] = _Request(request_id, text, token_ids, seqs)
        self.metrics.num_requests += 1
        self.metrics.prompt_tokens += len(token_ids) * params.n
        if prefilled is not None:
            admit_prefilled(seqs[0], prefilled, self.scheduler, self.stop_checker)
            self._arrived.append(request_id)
            return
        for seq in seqs:
            self.scheduler.add(seq)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-outputs compiler of this tokenizer, built on first use (any thread)."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                self._grammar_compiler = GrammarCompiler(
                    self.tokenizer, self.hf_config.vocab_size, sorted(self.stop_checker.eos_token_ids)
                )
            return self._grammar_compiler

    def compile_grammar(self, params: StructuredOutputsParams):
        """Compile (or find cached) the grammar of ``params``; ValueError naming the problem.

        Thread-safe: a server calls it from a worker thread before ``add_request``, whose own call
        then hits the cache, so compilation never stalls the step loop.
        """
        return self.grammar_compiler.compile(params)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"the checkpoint {self.config.model} has no tokenizer: pass the prompt as token ids")
            token_ids = list(self.tokenizer.encode(prompt))
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids, text = list(prompt), None
        else:
            raise ValueError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty: it must have at least one token")
        vocab = self.hf_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (vocab_size); found {bad[:8]}")
        return text, token_ids

    def _check_stop(self, seq: Sequence) -> None:
        """The stop checker, with a failure (e.g. a tokenizer that cannot decode a token) ending this
        sequence's request alone: it is aborted after the step and its error kept for the caller."""
        try:
            self.stop_checker(seq)
        except Exception as exc:  # noqa: BLE001 - attributed to this request, reported by pop_request_errors
            seq.finish_reason = "abort"
            self._request_errors.setdefault(seq.request_id, exc)

    def pop_request_errors(self) -> dict[str, BaseException]:
        """``request_id -> exception`` of requests that failed alone since the last call (already aborted)."""
        errors, self._request_errors = self._request_errors, {}
        return errors

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now, returning its slot and blocks; its final output (``"abort"``) or None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            (self.async_scheduler or self.scheduler).abort(seq)
        self.metrics.num_aborted_requests += 1
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        busy = self.async_scheduler is not None and self.async_scheduler.busy
        return self.scheduler.has_unfinished() or bool(self._arrived) or busy

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- step --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward; returns outputs (cumulative) of the requests that gained a token or finished."""
        if self._arrived:
            # NOTE: a prefilled request's first token goes out at once, not after its first decode step.
            arrived, self._arrived = self._arrived, []
            return [self._report(self.requests[rid]) for rid in arrived if rid in self.requests]
        pipeline = self.async_scheduler
        speculator = self.runner.speculator
        if pipeline is not None and speculator is not None:
            # NOTE: with a speculator only the steps that cannot draft are pipelined (async_step.py). A
            # synchronous step decides the next step's drafts at its end; a pipelined one cannot, so the
            # speculator counts the step as a refused proposal before it is launched.
            running = self.scheduler.running
            drafts = any(seq.spec_token_ids for seq in running)
            if not drafts and (self._drafts_decided or speculator.paused(len(running))):
                if not self._drafts_decided:
                    speculator.skip_step(len(running))
                progressed = pipeline.step()
                self._drafts_decided = False
            else:
                was_pipelined = pipeline.busy
                progressed = pipeline.drain()
                if was_pipelined:
                    self.runner.propose_drafts(self.scheduler.running, self.block_manager)
                progressed += self._sync_step()
                self._drafts_decided = True
        elif pipeline is not None:
            progressed = pipeline.step()
        else:
            progressed = self._sync_step()
        for request_id in self._request_errors:
            self.abort_request(request_id)
        return [self._report(self.requests[rid]) for rid in dict.fromkeys(seq.request_id for seq in progressed)
                if rid not in self._request_errors]

    def _sync_step(self) -> list[Sequence]:
        """Schedule, run, postprocess, propose drafts: the sequences that gained tokens."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            if self.scheduler.has_unfinished():
                raise RuntimeError(f"nothing could be scheduled with work pending: {self.stats()}")
            return []
        start = time.perf_counter()
        num_tokens_before = sum(seq.num_tokens for seq in batch.seqs)
        try:
            sampled = self.runner.run(batch)
        except Exception as exc:
            if self.executor is not None:
                self.executor.check(exc)  # a dead worker: WorkerDiedError naming it
            raise
        progressed = self.scheduler.postprocess(batch, sampled, commit=self.runner.commit_verified)
        # NOTE: drafts for the next step are proposed here, once this step's tokens are known.
        self.runner.propose_drafts(self.scheduler.running, self.block_manager)
        num_sampled = sum(seq.num_tokens for seq in batch.seqs) - num_tokens_before
        self.metrics.record_step(
            batch.num_prefill_tokens, batch.num_decode_tokens, num_sampled, time.perf_counter() - start
        )
        return progressed

    def _report(self, request: _Request) -> RequestOutput:
        """The request's output; a finished request is forgotten here."""
        if request.finished:
            del self.requests[request.request_id]
            self.metrics.num_finished_requests += 1
        return self._output(request)

    def warmup(self) -> float:
        """Run each shape class the scheduler produces once and forget it (see :mod:`deltaserve.engine.warmup`),
        so kernel compilation and autotuning happen here instead of in requests. Returns its seconds."""
        seconds = run_warmup(self)
        self.metrics = EngineMetrics()
        if self.runner.speculator is not None:
            self.runner.speculator.reset_metrics()
        self.scheduler.num_preemptions = self.scheduler.num_slot_waits = 0
        return seconds

    # ---- tensor parallelism ------------------------------------------------------------------

    def collective_rpc(self, method, *args) -> list:
        """Run a ``ModelRunner`` method name (or a picklable ``fn(runner, *args)``) on every TP rank;
        the results in rank order (one entry at TP 1)."""
        from deltaserve.distributed.worker import Call, call_on

        own = call_on(self.runner, Call(method, args))
        return [own] if self.executor is None else [own, *self.executor.collective_rpc(method, *args)]

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (nothing to do at TP 1); the engine is unusable afterwards."""
        if self.executor is not None:
            self.executor.shutdown()

    def _output(self, request: _Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            if seq.logprobs:
                self._decode_logprob_tokens(seq.logprobs[-1])
            text = visible_text(seq)
            offsets = None
            if seq.text_offsets is not None:
                offsets = [min(offset, len(text)) for offset in seq.text_offsets]
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=seq.output_token_ids,  # a fresh list (a slice)
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                    text_offsets=offsets,
                    num_draft_tokens=seq.num_draft_tokens,
                    num_accepted_tokens=seq.num_accepted_tokens,
                )
            )
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions, request.finished,
            prompt_logprobs=self._prompt_logprobs(request.seqs[0]),
            num_cached_tokens=request.seqs[0].num_cached_tokens or 0,
        )

    def _prompt_logprobs(self, seq: Sequence) -> list | None:
        """The prompt's logprob entries (decoded) once all are computed, else None."""
        entries = seq.prompt_logprobs
        if entries is None or len(entries) < seq.num_prompt_tokens:
            return None
        if not seq.prompt_logprobs_decoded:
            for entry in entries[1:]:
                self._decode_logprob_tokens(entry)
            seq.prompt_logprobs_decoded = True
        return list(entries)

    def _decode_logprob_tokens(self, entry: dict[int, Logprob]) -> None:
        if self.tokenizer is None:
            return
        for token_id, logprob in entry.items():
            if logprob.decoded_token is None:
                entry[token_id] = logprob._replace(decoded_token=self.tokenizer.decode([token_id]))

    # ---- metrics -----------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters (see ``EngineMetrics``), queue and cache occupancy, and prefix-cache counters.

        Usage counts what running sequences hold (``*_used``, ``*_usage_perc``): slots and blocks
        that only the prefix cache holds count as free, as vLLM's ``kv_cache_usage_perc``, since the
        cache gives them back whenever a request needs them; they are ``*_cached``.
        """
        pool = self.runner.state_pool
        running = self.scheduler.running
        slots_used = sum(seq.state_slot is not None for seq in running)
        blocks_used = len({block_id for seq in running for block_id in seq.block_table})
        out = self.metrics.as_dict()
        out.update(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_preemptions=self.scheduler.num_preemptions,
            num_slot_waits=self.scheduler.num_slot_waits,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            prefix_cache_hit_tokens=0,
            prefix_cache_miss_tokens=0,
            checkpoints_stored=0,
            checkpoints_evicted=0,
            state_slots_used=slots_used,
            state_slots_cached=pool.num_used_slots - slots_used,
            state_slots_total=pool.num_slots,
            state_pool_usage_perc=slots_used / pool.num_slots,
            kv_blocks_used=blocks_used,
            kv_blocks_cached=self.block_manager.num_used_blocks - blocks_used,
            kv_blocks_total=self.block_manager.num_blocks,
            kv_cache_usage_perc=blocks_used / self.block_manager.num_blocks,
        )
        out.update(self.scheduler.prefix_cache.stats())
        out.update(self.scheduler.kv_connector.stats())
        if self.runner.speculator is not None:
            out.update(self.runner.speculator.metrics.as_stats())
        return out

    def reset_prefix_cache(self) -> None:
        """Drop every cached checkpoint and block (running requests keep theirs)."""
        if self.prefix_cache is not None:
            self.prefix_cache.reset()

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turn the prefix cache on or off between workloads (``deltaserve bench`` compares the two).

        Needs an engine built with ``enable_prefix_caching`` (its pool has the checkpoint slots) and no
        request in flight; the cache is emptied either way.
        """
        if self.prefix_cache is None:
            raise ValueError("this engine was built with enable_prefix_caching=False")
        if self.has_unfinished_requests():
            raise ValueError("set_prefix_caching needs an idle engine: requests are running or waiting")
        self.prefix_cache.reset()
        self.scheduler.prefix_cache = self.prefix_cache if enabled else NoPrefixCache()

    get_metrics = stats
