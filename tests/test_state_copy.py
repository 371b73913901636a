"""State copies against a naive per-pair, per-layer loop written here (vLLM's copy rules)."""

import pytest
import torch

from deltaserve.state.copy import copy_slots, copy_spec_decode_states
from deltaserve.state.layout import gdn_layout, kda_layout, short_conv_layout
from deltaserve.state.pool import StateGroup, StatePool

SENTINEL = 1e30
KERNEL = 4


def make_pool(num_slots, conv_layout="SD", num_spec=0, with_short_conv=True):
    f64 = dict(model_dtype=torch.float64, conv_layout=conv_layout)
    groups = {
        # Grouped widths (q = k = 8, v = 16); KDA's recurrent state is float32 whatever the cache dtype.
        "kda": StateGroup(kda_layout(2, 8, num_k_heads=2, head_k_dim=4, num_spec=num_spec, **f64), 3),
        "gdn": StateGroup(gdn_layout(1, 2, 4, 4, num_spec=num_spec, ssm_dtype="float64", **f64), 2),
    }
    if with_short_conv:
        groups["short"] = StateGroup(short_conv_layout(6, 3, **f64), 2)
    pool = StatePool(groups, num_slots)
    generator = torch.Generator().manual_seed(0)
    for tensor in [*pool.conv.values(), *pool.recurrent.values()]:
        if tensor is not None:
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64))
    return pool


def snapshot(pool):
    return {(kind, name): t.clone() for kind, d in (("conv", pool.conv), ("rec", pool.recurrent)) for name, t in d.items() if t is not None}


def assert_pool_equals(pool, expected):
    for (kind, name), tensor in expected.items():
        actual = (pool.conv if kind == "conv" else pool.recurrent)[name]
        assert torch.equal(actual, tensor), f"{kind} state of group {name} differs"


# ---- copy_slots ------------------------------------------------------------------------------


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("group", [None, "kda"])
def test_copy_slots_matches_per_pair_per_layer_loop(conv_layout, group):
    pool = make_pool(8, conv_layout)
    pool.conv["kda"][:, [0, 7, 8]] = SENTINEL  # null slot and unused slots
    before = snapshot(pool)
    src, dst = [1, 2, 3], [6, 4, 5]
    copy_slots(pool, torch.tensor(src), dst, group=group)
    expected = {key: t.clone() for key, t in before.items()}
    for (kind, name), tensor in expected.items():
        if group is not None and name != group:
            continue
        for layer in range(tensor.shape[0]):
            for s, d in zip(src, dst):
                tensor[layer, d] = before[(kind, name)][layer, s]
    assert_pool_equals(pool, expected)
    assert torch.all(pool.conv["kda"][:, [0, 7, 8]] == SENTINEL)


def test_copy_slots_with_no_pairs_changes_nothing():
    pool = make_pool(4)
    before = snapshot(pool)
    copy_slots(pool, [], [])
    assert_pool_equals(pool, before)


@pytest.mark.parametrize(
    "src, dst, message",
    [
        ([1, 2], [2, 3], r"overlap in slots \[2\]"),
        ([1], [0], "null slot 0"),
        ([0], [1], "null slot 0"),
        ([1], [9], "slot 9; allowed slots are 1..4"),
        ([-1], [2], "slot -1"),
        ([1, 2], [3, 3], "more than once"),
        ([1, 2], [3], "src has 2 slots but dst has 1"),
    ],
)
def test_copy_slots_rejects_bad_slots(src, dst, message):
    pool = make_pool(4)
    before = snapshot(pool)
    with pytest.raises(ValueError, match=message):
        copy_slots(pool, src, dst)
    assert_pool_equals(pool, before)


def test_copy_slots_rejects_float_slot_ids():
    with pytest.raises(TypeError, match="integer slot ids"):
        copy_slots(make_pool(4), torch.tensor([1.0]), [2])


def test_copy_slots_rejects_unknown_group():
    with pytest.raises(KeyError, match="'mla'"):
        copy_slots(make_pool(4), [1], [2], group="mla")


# ---- copy_spec_decode_states -----------------------------------------------------------------


def spec_decode_reference(before, pool, src_blocks, dst, num_accepted, groups):
    """vLLM's rule per request and layer: conv[dst, :L-o] = conv[blocks[0], o:], rec[dst] = rec[blocks[o]]."""
    expected = {key: t.clone() for key, t in before.items()}
    for name in groups:
        layout = pool.groups[name].layout
        length = layout.conv_state_len
        conv_before, conv = before[("conv", name)], expected[("conv", name)]
        for i, d in enumerate(dst):
            offset = max(num_accepted[i], 1) - 1
            for layer in range(conv.shape[0]):
                window = conv_before[layer, src_blocks[i][0]]
                if layout.conv_layout == "SD":
                    conv[layer, d, : length - offset] = window[offset:]
                else:
                    conv[layer, d, :, : length - offset] = window[:, offset:]
                if ("rec", name) in expected:
                    expected[("rec", name)][layer, d] = before[("rec", name)][layer, src_blocks[i][offset]]
    return expected


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("num_spec", [1, 3])
def test_spec_decode_copy_matches_loop_for_every_num_accepted(conv_layout, num_spec):
    # One request per value of num_accepted_tokens in 0..1+num_spec (0 is clamped to 1).
    num_accepted = list(range(0, 2 + num_spec))
    columns = 1 + num_spec
    num_requests = len(num_accepted)
    pool = make_pool(num_requests * (columns + 1) + 2, conv_layout, num_spec, with_short_conv=False)
    src_blocks = [[1 + i * columns + j for j in range(columns)] for i in range(num_requests)]
    dst = [1 + num_requests * columns + i for i in range(num_requests)]
    unused = [0, pool.num_slots - 1, pool.num_slots]
    for name in ("kda", "gdn"):
        pool.conv[name][:, unused] = SENTINEL
        pool.recurrent[name][:, unused] = SENTINEL
    before = snapshot(pool)
    copy_spec_decode_states(pool, torch.tensor(src_blocks), torch.tensor(dst), torch.tensor(num_accepted))
    assert_pool_equals(pool, spec_decode_reference(before, pool, src_blocks, dst, num_accepted, ["kda", "gdn"]))
    for name in ("kda", "gdn"):
        assert torch.all(pool.conv[name][:, unused] == SENTINEL)
        assert torch.all(pool.recurrent[name][:, unused] == SENTINEL)


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_spec_decode_window_ends_at_last_accepted_input(conv_layout):
    # Verify step over t0..t2 (num_spec = 2): the source window holds inputs p1 p2 t0 t1 t2 (oldest
    # first, K - 1 = 3 history inputs p0 p1 p2 minus the one that fell out). With n accepted, the
    # first K - 1 rows of the destination are the K - 1 inputs ending at t_{n-1}.
    pool = make_pool(4, conv_layout, num_spec=2, with_short_conv=False)
    layout = pool.groups["kda"].layout
    inputs = torch.arange(5, dtype=torch.float64)[:, None].expand(5, layout.conv_dim)  # value = position
    window = inputs if conv_layout == "SD" else inputs.T
    for n in (1, 2, 3):
        pool.conv["kda"][:, 1] = window
        copy_spec_decode_states(pool, [[1, 2, 3]], [4], [n], group="kda")
        kept = pool.conv["kda"][0, 4] if conv_layout == "SD" else pool.conv["kda"][0, 4].T
        assert kept[:3, 0].tolist() == [n - 1, n, n + 1]


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_spec_decode_copy_into_own_source_slot(conv_layout):
    # dst may be the request's first block: all reads happen before any write.
    pool = make_pool(8, conv_layout, num_spec=2, with_short_conv=False)
    before = snapshot(pool)
    src_blocks, dst, num_accepted = [[1, 2, 3], [4, 5, 6]], [1, 6], [3, 2]
    copy_spec_decode_states(pool, src_blocks, dst, num_accepted)
    assert_pool_equals(pool, spec_decode_reference(before, pool, src_blocks, dst, num_accepted, ["kda", "gdn"]))


def test_spec_decode_with_one_group_leaves_other_groups():
    pool = make_pool(8, num_spec=1, with_short_conv=False)
    before = snapshot(pool)
    copy_spec_decode_states(pool, [[1, 2]], [3], [2], group="gdn")
    expected = spec_decode_reference(before, pool, [[1, 2]], [3], [2], ["gdn"])
    assert_pool_equals(pool, expected)
    assert torch.equal(pool.conv["kda"], before[("conv", "kda")])


@pytest.mark.parametrize(
    "src_blocks, dst, num_accepted, message",
    [
        ([[1, 2]], [3], [3], r"num_accepted_tokens must be in 0..2"),
        ([[1, 2]], [3], [-1], r"num_accepted_tokens must be in 0..2"),
        ([[1, 2]], [0], [1], "null slot 0"),
        ([[1, 2], [4, 5]], [3, 3], [1, 1], "more than once"),
        ([[1, 2]], [3, 4], [1, 1], r"\[N, 1 \+ num_spec\] with N = 2"),
        ([[1, 2]], [3], [1, 1], "2 entries, expected N = 1"),
        ([[1, 9]], [3], [1], "slot 9"),
    ],
)
def test_spec_decode_rejects_bad_arguments(src_blocks, dst, num_accepted, message):
    pool = make_pool(8, num_spec=1, with_short_conv=False)
    before = snapshot(pool)
    with pytest.raises(ValueError, match=message):
        copy_spec_decode_states(pool, src_blocks, dst, num_accepted)
    assert_pool_equals(pool, before)


def test_spec_decode_needs_conv_rows_for_the_accepted_shift():
    # num_spec = 0 layout: conv_state_len = K - 1 has no room to shift by one token.
    pool = make_pool(8, num_spec=0, with_short_conv=False)
    with pytest.raises(ValueError, match="needs conv_state_len >= 4"):
        copy_spec_decode_states(pool, [[1, 2]], [3], [2])
    copy_spec_decode_states(pool, [[1, 2]], [3], [1])  # no shift: fine


# ---- GDN pools as the engine allocates them ----------------------------------------------------


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
@pytest.mark.parametrize("ssm_dtype", ["float32", "bfloat16"])
def test_gdn_pool_copies_match_float64_loop(conv_layout, ssm_dtype):
    # Qwen3-Next-like proportions: GVA (Hk=2, Hv=4), Dk != Dv, bf16 conv, fp32 or bf16 recurrent state
    num_spec = 2
    layout = gdn_layout(2, 4, 8, 4, num_spec=num_spec, conv_layout=conv_layout, model_dtype=torch.bfloat16,
                        ssm_dtype=ssm_dtype)  # fmt: skip
    assert layout.conv_split == (16, 16, 16) and layout.recurrent_shape == (4, 4, 8)
    pool = StatePool({"gdn": StateGroup(layout, 3)}, num_slots=12)
    for tensor in (pool.conv["gdn"], pool.recurrent["gdn"]):
        tensor.copy_(torch.randn(tensor.shape, dtype=torch.float64))
    pool.conv["gdn"][:, [0, 12]] = SENTINEL
    pool.recurrent["gdn"][:, [0, 12]] = SENTINEL
    before = snapshot(pool)
    as_f64 = {key: t.double() for key, t in before.items()}

    copy_slots(pool, [1, 2], [7, 8])
    expected = {key: t.clone() for key, t in as_f64.items()}
    for tensor in expected.values():
        for s, d in ((1, 7), (2, 8)):
            tensor[:, d] = tensor[:, s].clone()
    for key, tensor in expected.items():
        assert torch.equal((pool.conv if key[0] == "conv" else pool.recurrent)["gdn"].double(), tensor), key

    pool = StatePool({"gdn": StateGroup(layout, 3)}, num_slots=12)
    for key, tensor in before.items():
        (pool.conv if key[0] == "conv" else pool.recurrent)["gdn"].copy_(tensor)
    src_blocks, dst, num_accepted = [[1, 2, 3], [4, 5, 6], [7, 8, 9]], [10, 11, 7], [0, 2, 3]
    copy_spec_decode_states(pool, src_blocks, dst, num_accepted)
    expected = spec_decode_reference(as_f64, pool, src_blocks, dst, num_accepted, ["gdn"])
    for key, tensor in expected.items():
        assert torch.equal((pool.conv if key[0] == "conv" else pool.recurrent)["gdn"].double(), tensor), key
    assert torch.all(pool.conv["gdn"][:, [0, 12]] == SENTINEL) and torch.all(pool.recurrent["gdn"][:, [0, 12]] == SENTINEL)
