"""deltaserve: an inference engine for hybrid linear-attention language models."""

__version__ = "0.1.0"


def __getattr__(name):
    # NOTE: lazy, so that `import deltaserve.state.layout` does not pull in the engine.
    if name == "StructuredOutputsParams":
        from deltaserve.structured.params import StructuredOutputsParams

        return StructuredOutputsParams
    if name in ("LLM", "SamplingParams"):
        from deltaserve.engine import llm as _llm
        from deltaserve.engine import sampling_params as _sp

        return {"LLM": _llm.LLM, "SamplingParams": _sp.SamplingParams}[name]
    raise AttributeError(f"module 'deltaserve' has no attribute {name!r}")
