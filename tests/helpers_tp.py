"""Tensor-parallel test helpers: a tiny checkpoint whose head counts divide by 4, a logits tap."""

from __future__ import annotations

from pathlib import Path

import torch

from deltaserve.models.tiny import make_tiny

# NOTE: 4 KDA and 4 MLA heads (TP 1, 2, 4 divide them); vocab 330 does not divide by 4, so the last
# rank's vocabulary shard is padded.
TP_OVERRIDES = {"num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 330, "linear_attn_config": {"num_heads": 4}}


def make_tp_checkpoint(path: Path) -> Path:
    return make_tiny(Path(path) / "tiny-tp", seed=1, overrides=TP_OVERRIDES)


LOGITS_TOL = 1e-5
# One engine setting for every scenario: chunks of 16 tokens, few blocks (so preemption), prefix caching
# with checkpoints at chunk ends (these prompts are shorter than the in-forward capture grid of 64
# tokens; test_tensor_parallel_capture.py runs the in-forward capture under TP).
ENGINE = dict(
    max_num_seqs=4, max_num_batched_tokens=16, block_size=4, num_kv_blocks=24, seed=0,
    extra={"checkpoints_in_forward": False},
)  # fmt: skip


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    from helpers_engine import random_prompts

    return random_prompts(lengths, seed=seed)


SHARED_PREFIX = _prompts([20], 7)[0]
SCENARIOS = {
    "alone": ([_prompts([7], 1)[0]], 8),
    "batched": (_prompts([5, 9, 12], 2), 6),
    "chunked": (_prompts([37], 3), 6),  # chunks of 16 tokens
    "preempted": (_prompts([14, 14, 14, 14], 4), 14),  # 4 x 7 blocks > 24
    "prefix_hits": ([SHARED_PREFIX + t for t in _prompts([3, 5, 6], 5)], 5),
}


def greedy(n: int):
    from deltaserve import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def tapped(llm):
    """``llm`` with a :class:`LogitsTap` on its (rank 0) sampler."""
    llm.llm_engine.runner.sampler = LogitsTap(llm.llm_engine.runner.sampler)
    return llm


def run_scenario(llm, name: str) -> dict:
    """Tokens, per-step logits and counters of one scenario, from an empty prefix cache."""
    llm.reset_prefix_cache()
    tap = llm.llm_engine.runner.sampler
    tap.logits.clear()
    before = llm.get_metrics()
    prompts, n = SCENARIOS[name]
    rounds = 2 if name == "prefix_hits" else 1  # the second round hits the checkpoints
    tokens = [o.outputs[0].token_ids for _ in range(rounds) for o in llm.generate(prompts, greedy(n), use_tqdm=False)]
    after = llm.get_metrics()
    counters = {k: after[k] - before[k] for k in ("num_preemptions", "prefix_cache_hits")}
    return {"tokens": tokens, "logits": list(tap.logits), **counters}


def assert_same_run(got: dict, want: dict, name: str) -> None:
    """Identical greedy tokens and counters; every step's logits within ``LOGITS_TOL``."""
    assert got["tokens"] == want["tokens"]
    assert len(got["logits"]) == len(want["logits"])
    for step, (a, b) in enumerate(zip(got["logits"], want["logits"])):
        assert a.shape == b.shape and not a.isnan().any(), step
        assert (a - b).abs().max().item() <= LOGITS_TOL, f"step {step}: {(a - b).abs().max().item():.2e}"
    if name == "preempted":
        assert got["num_preemptions"] > 0 and got["num_preemptions"] == want["num_preemptions"]
    if name == "prefix_hits":
        assert got["prefix_cache_hits"] >= 3 and got["prefix_cache_hits"] == want["prefix_cache_hits"]


def pool_states(runner, group: str, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(conv, recurrent)`` states of ``slots`` in pool ``group``, ``[layers, len(slots), ...]``."""
    index = torch.tensor(slots)
    pool = runner.state_pool
    return pool.conv[group][:, index].clone(), pool.recurrent[group][:, index].clone()


def assert_checkpoints_sharded(tp_llm, reference_llm, group: str) -> None:
    """The prefix-cache checkpoints both engines hold (matched by key) hold, on every rank, that rank's
    share of each conv block (``[q | k | v]``) and its heads of the TP-1 recurrent state."""

    def slots(llm) -> dict:
        return {entry.key: entry.slot for entry in llm.llm_engine.prefix_cache.index.entries()}

    ours, theirs = slots(tp_llm), slots(reference_llm)
    # NOTE: the cache budget is per rank, where states shrink with TP and the KV cache may not, so
    # TP may keep a checkpoint that TP 1 evicted; the ones both keep are compared.
    keys = sorted(ours.keys() & theirs.keys())
    assert len(keys) >= 3
    ref_runner = reference_llm.llm_engine.runner
    conv1, rec1 = pool_states(ref_runner, group, [theirs[k] for k in keys])
    blocks = ref_runner.state_pool.groups[group].layout.conv_split
    tp = tp_llm.llm_engine.config.tensor_parallel_size
    states = tp_llm.llm_engine.collective_rpc(pool_states, group, [ours[k] for k in keys])
    for rank, (conv, rec) in enumerate(states):
        offsets = [sum(blocks[:i]) for i in range(len(blocks))]
        parts = [conv1[..., o + rank * (n // tp) : o + (rank + 1) * (n // tp)] for o, n in zip(offsets, blocks)]
        heads = rec1.shape[2] // tp
        assert (conv - torch.cat(parts, dim=-1)).abs().max() <= LOGITS_TOL, rank
        assert (rec - rec1[:, :, rank * heads : (rank + 1) * heads]).abs().max() <= LOGITS_TOL, rank
        assert rec.abs().sum() > 0


class LogitsTap:
    """Wraps a runner's sampler and keeps a copy of the float32 logits of every step."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.logits = []

    def __call__(self, logits, *args, **kwargs):
        self.logits.append(logits.detach().clone())
        return self.sampler(logits, *args, **kwargs)


# ---- GatedDeltaNet under TP, one layer, real processes -----------------------------------------------

GDN_SIZES = dict(hidden=32, hk=2, hv=4, dk=16, dv=8, kernel=4)


def load_slots(module, weights: Path) -> None:
    """Load every checkpoint slot of ``module`` (this rank's share) from the safetensors file ``weights``,
    which must hold exactly those tensors, each of its slot's shape."""
    from safetensors import safe_open

    from deltaserve.models.loader import checkpoint_slots

    slots = checkpoint_slots(module)
    with safe_open(weights, framework="pt") as f:
        assert set(f.keys()) == set(slots)
        for name, (shape, load) in slots.items():
            assert tuple(f.get_slice(name).get_shape()) == shape, name
            load(f.get_slice(name))


def gdn_config(projection: str):
    from transformers import Qwen3_5TextConfig, Qwen3NextConfig

    s = GDN_SIZES
    config_class = Qwen3NextConfig if projection == "qkvz" else Qwen3_5TextConfig
    return config_class(
        hidden_size=s["hidden"], num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=s["hk"], linear_num_value_heads=s["hv"], linear_key_head_dim=s["dk"],
        linear_value_head_dim=s["dv"], linear_conv_kernel_dim=s["kernel"], num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, rms_norm_eps=1e-6,
    )  # fmt: skip


def run_gdn_layer(projection: str, weights: Path, hidden: torch.Tensor, tp_size: int):
    """This process's GatedDeltaNet shard (weights read through the loader's slots from ``weights``) over
    a prefill of two sequences (5 and 3 tokens) then one decode step each: ``(outputs, conv, recurrent)``
    with the states of both sequences' slots (1, 2)."""
    from safetensors import safe_open

    from deltaserve.forward_context import forward_context, make_forward_context
    from deltaserve.layers.gdn import GatedDeltaNet
    from deltaserve.state.layout import gdn_layout
    from deltaserve.state.pool import StateGroup, StatePool

    s = GDN_SIZES
    layer = GatedDeltaNet.from_config(gdn_config(projection), layer_idx=0, projection=projection).eval()
    load_slots(layer, weights)
    layout = gdn_layout(s["hk"], s["hv"], s["dk"], s["dv"], conv_kernel_size=s["kernel"], tp_size=tp_size,
                        model_dtype=torch.float32, ssm_dtype="float32")  # fmt: skip
    pool = StatePool({"gdn": StateGroup(layout, 1)}, num_slots=3)
    pool.allocate(2)
    layer.bind_state(pool.layer_state("gdn", 0), layout)
    outs = []
    with torch.no_grad():
        for query_lens, computed, rows in (([5, 3], [0, 0], hidden[:8]), ([1, 1], [5, 3], hidden[8:10])):
            ctx = make_forward_context(query_lens, computed, [1, 2])
            positions = torch.cat([torch.arange(c, c + q) for c, q in zip(computed, query_lens)])
            with forward_context(ctx):
                outs.append(layer(positions, rows))
    conv, recurrent = pool.layer_state("gdn", 0)
    return torch.cat(outs), conv[1:3].clone(), recurrent[1:3].clone()


def gdn_worker(rank: int, world_size: int, init_method: str, weights: dict, hidden: torch.Tensor) -> None:
    """Rank ``rank`` of a gloo group: run both projections' layers, send the results to rank 0."""
    from deltaserve.distributed.message_queue import gather_to_first
    from deltaserve.distributed.parallel_state import destroy_distributed, init_distributed

    init_distributed(rank, world_size, init_method=init_method, timeout_s=60)
    for projection, path in weights.items():
        gather_to_first(run_gdn_layer(projection, path, hidden, world_size))
    destroy_distributed()



# ---- MergedLinear under TP, real processes -----------------------------------------------------------

MERGED_HIDDEN = 6


def merged_blocks():
    """Blocks of every kind: split, split with sub-blocks (``[q | k | v]``), replicated with a bias, split."""
    from deltaserve.layers.linear import LinearBlock

    return [
        LinearBlock("q_proj", 8),
        LinearBlock("in_proj_qkv", (4, 4, 8)),
        LinearBlock("f_a_proj", 3, sharded=False, bias=True),
        LinearBlock("b_proj", 2),
    ]


def merged_holder():
    """A module holding one ``MergedLinear`` (``in_proj``) with its views under the blocks' names."""
    from torch import nn

    from deltaserve.layers.linear import MergedLinear

    holder = nn.Module()
    holder.in_proj = MergedLinear(MERGED_HIDDEN, merged_blocks())
    for block, view in zip(holder.in_proj.blocks, holder.in_proj.views):
        setattr(holder, block.name, view)
    return holder


def run_merged_linear(weights: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's merged layer, loaded through the loader's slots from ``weights``: ``(weight, bias, y)``."""
    holder = merged_holder()
    # NOTE: NaN first: a row that no block loads shows up.
    holder.in_proj.weight.data.fill_(float("nan"))
    holder.in_proj.bias.data.fill_(float("nan"))
    load_slots(holder, weights)
    with torch.no_grad():
        y = holder.in_proj(x)
    return holder.in_proj.weight.detach().clone(), holder.in_proj.bias.detach().clone(), y


def merged_linear_worker(rank: int, world_size: int, init_method: str, weights: Path, x: torch.Tensor) -> None:
    from deltaserve.distributed.message_queue import gather_to_first
    from deltaserve.distributed.parallel_state import destroy_distributed, init_distributed

    init_distributed(rank, world_size, init_method=init_method, timeout_s=60)
    gather_to_first(run_merged_linear(weights, x))
    destroy_distributed()
