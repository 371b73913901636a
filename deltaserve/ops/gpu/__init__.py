"""GPU implementations of the kernel-level ops (Triton; fla-core for KDA's gate, chunked prefill and norms).

Imported only through ``deltaserve.ops.gpu_impl`` when a CUDA tensor reaches a public op, so a CPU
machine never imports Triton or fla. Modules, each mirroring the public op module of the same name:

- ``conv1d``: the project's Triton causal conv1d (varlen prefill, decode update), slot-indexed, any strides;
- ``kda``: fla-core's ``kda_gate_fwd`` and ``chunk_kda`` (V-first state layout, gathered/scattered
  slots) and the project's Triton decode kernel (in place on the slots);
- ``norm``: fla-core's fused RMSNorm and sigmoid-gated RMSNorm;
- ``state_copy``: fused slot-to-slot copies over all layers (used by ``deltaserve.state.copy``).
"""
