"""What a request constrains its output to: vLLM's ``StructuredOutputsParams``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# NOTE: the field that set a constraint names the constraint in errors, so a 400 points at it.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint on a request's output (the ``structured_outputs`` of ``SamplingParams``).

    - ``json``: a JSON schema (a dict or its JSON text); the output is one JSON value valid for it.
    - ``regex``: the output matches the regular expression in full.
    - ``choice``: the output is one of these strings.
    - ``grammar``: an EBNF grammar (xgrammar's / GBNF syntax, rule ``root``).
    - ``json_object``: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``).
    - ``structural_tag``: an xgrammar structural tag (a dict or its JSON text), as tool calling uses.
    - ``disable_any_whitespace``: JSON without free whitespace between tokens (vLLM's name).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [kind for kind in KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs: exactly one of {', '.join(KINDS)} must be set, got "
                f"{', '.join(given) if given else 'none'}"
            )
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"structured_outputs.choice: a non-empty list of non-empty strings, got {self.choice!r}")
            object.__setattr__(self, "choice", tuple(self.choice))
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{kind}: a non-empty string, got {value!r}")
        for kind in ("json", "structural_tag"):
            value = getattr(self, kind)
            if value is not None and not isinstance(value, (str, dict)):
                raise ValueError(f"structured_outputs.{kind}: a dict or a JSON string, got {type(value).__name__}")

    @property
    def kind(self) -> str:
        """The name of the constraint that is set (one of ``KINDS``)."""
        return next(kind for kind in KINDS if getattr(self, kind) not in (None, False))

    def cache_key(self) -> tuple[str, str, bool]:
        """A hashable key of what is compiled: equal keys give the same grammar."""
        value: Any = getattr(self, self.kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif isinstance(value, tuple):
            value = json.dumps(list(value))
        return self.kind, str(value), self.disable_any_whitespace
