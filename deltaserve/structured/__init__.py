"""Structured outputs: grammar-constrained decoding with xgrammar.

``StructuredOutputsParams`` (on ``SamplingParams.structured_outputs``) says what the output must
match; ``GrammarCompiler`` compiles it (cached, off the step loop); each constrained sequence owns a
``StructuredMatcher``; the sampler calls ``apply_structured_outputs`` on the batch's logits.
"""

from deltaserve.structured.compiler import GrammarCompiler
from deltaserve.structured.logits import apply_structured_outputs
from deltaserve.structured.matcher import StructuredMatcher
from deltaserve.structured.params import StructuredOutputsParams

__all__ = ["GrammarCompiler", "StructuredMatcher", "StructuredOutputsParams", "apply_structured_outputs"]
