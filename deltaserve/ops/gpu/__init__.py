"""GPU implementations of the kernel-level ops (Triton and torch; fla-core for chunked prefill and norms).

Imported only through ``deltaserve.ops.gpu_impl`` when a CUDA tensor reaches a public op, so a CPU
machine never imports Triton or fla. Modules, each mirroring the public op module of the same name:

- ``attention``: paged MLA attention (weight absorption, one Triton kernel) and the KV cache write;
- ``conv1d``: the project's Triton causal conv1d (varlen prefill, decode update), slot-indexed, any strides;
- ``delta_rule``: the delta rule of KDA and GDN: fla-core's ``chunk_kda`` / ``chunk_gated_delta_rule``
  (V-first state layout, gathered/scattered slots), the project's Triton decode kernel (per-channel or
  per-head gate, GVA, in place on the slots) and GDN's gate kernel;
- ``chunk_states``: fla's chunked pipeline run step by step with its per-chunk states stored in
  float32 (prefix-cache checkpoints inside the forward);
- ``kda``: KDA's forget gate with the write strength ``beta`` (one Triton launch, strided inputs);
- ``kda_decode``: one fused kernel for a KDA layer's whole decode step (tests and benchmarks only:
  the layer composes the ops above, which are faster under CUDA graphs, benchmarks/RESULTS.md);
- ``moe``: routed experts through ``torch._grouped_mm`` (bf16) or dense batched matmuls, no host sync;
- ``norm``: fla-core's fused RMSNorm and sigmoid-gated RMSNorm;
- ``sampling``: greedy token and logprob in one pass over the logits (split rows, merged);
- ``state_copy``: fused slot-to-slot copies over all layers (used by ``deltaserve.state.copy``).
"""

import os

# NOTE: fla memoises chunk indices per cu_seqlens object in a queue of FLA_TENSOR_CACHE_SIZE
# entries (4 by default, a host sync on a miss); one forward can pass several (the batch's, a
# speculative step's verify and other rows'), every linear layer again. Set before fla is imported.
os.environ.setdefault("FLA_TENSOR_CACHE_SIZE", "64")
