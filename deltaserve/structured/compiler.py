"""Grammar compilation with xgrammar, cached, safe to call from any thread (never from ``step()``)."""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

from deltaserve.structured.params import StructuredOutputsParams

# NOTE: compiled grammars are small (a JSON schema's is tens of KB) but a server sees many schemas;
# the least recently used go first.
DEFAULT_CACHE_SIZE = 256
# xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the rest names the problem.
_CPP_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class GrammarCompiler:
    """Compiles ``StructuredOutputsParams`` for one tokenizer; ``compile`` is cached and thread-safe.

    ``vocab_size`` is the model's (the logits' width, which may exceed the tokenizer's); tokens past
    the tokenizer are never allowed. ``stop_token_ids`` end a finished grammar (EOS).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int], cache_size: int = DEFAULT_CACHE_SIZE):
        import xgrammar as xgr

        if tokenizer is None:
            raise ValueError("structured outputs need the checkpoint's tokenizer; this checkpoint has none")
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        # NOTE: xgrammar's own cache is off: this one is keyed by the request's params and counts hits.
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0
        self.num_cache_hits = 0

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The ``xgrammar.CompiledGrammar`` of ``params``; ValueError naming the field and the problem."""
        key = params.cache_key()
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return compiled
        compiled = self._compile(params)
        with self._lock:
            self._cache[key] = compiled
            self.num_compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        compiler = self._compiler
        try:
            if kind == "json":
                schema = params.json if isinstance(params.json, str) else json.dumps(params.json)
                return compiler.compile_json_schema(schema, any_whitespace=not params.disable_any_whitespace)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object"}', any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                # NOTE: JSON string escapes are EBNF string escapes, so any choice text is quoted exactly.
                return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c) for c in params.choice))
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            tag = params.structural_tag
            return compiler.compile_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))
        except (RuntimeError, ValueError, TypeError) as exc:
            message = _CPP_PREFIX.sub("", str(exc).strip()).strip()
            raise ValueError(f"structured_outputs.{kind}: cannot be compiled: {message}") from None
