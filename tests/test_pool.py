"""StatePool: slot bookkeeping, zeroing and views."""

import pytest
import torch

from deltaserve.state.layout import kda_layout, short_conv_layout
from deltaserve.state.pool import NULL_SLOT, PoolExhausted, StateGroup, StatePool


def make_pool(num_slots=4, conv_layout="SD"):
    kda = kda_layout(4, 8, num_k_heads=2, head_k_dim=4, conv_layout=conv_layout, model_dtype=torch.float32)
    conv = short_conv_layout(16, 3, conv_layout=conv_layout, model_dtype=torch.float32)
    return StatePool({"kda": StateGroup(kda, 3), "conv": StateGroup(conv, 2)}, num_slots)


def test_tensors_have_one_row_per_slot_plus_the_null_slot():
    pool = make_pool(num_slots=4)
    assert pool.conv["kda"].shape == (3, 5, 3, 48)
    assert pool.recurrent["kda"].shape == (3, 5, 4, 8, 4)
    assert pool.recurrent["kda"].dtype == torch.float32
    assert pool.conv["conv"].shape == (2, 5, 2, 16) and pool.recurrent["conv"] is None


def test_allocate_hands_out_every_slot_but_never_the_null_slot():
    pool = make_pool(num_slots=4)
    slots = pool.allocate(4)
    assert sorted(slots) == [1, 2, 3, 4] and NULL_SLOT not in slots
    assert pool.num_free_slots == 0 and pool.num_used_slots == 4


def test_allocate_beyond_capacity_raises_pool_exhausted():
    pool = make_pool(num_slots=2)
    pool.allocate(1)
    with pytest.raises(PoolExhausted, match="1 free slots of 2, 2 requested"):
        pool.allocate(2)
    assert pool.num_free_slots == 1  # a failed allocation takes nothing


def test_free_returns_slots_for_reuse():
    pool = make_pool(num_slots=2)
    slots = pool.allocate(2)
    pool.free([slots[0]])
    assert pool.allocate(1) == [slots[0]]


def test_double_free_is_rejected():
    pool = make_pool()
    (slot,) = pool.allocate(1)
    pool.free([slot])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([slot])


def test_repeated_slot_in_one_free_call_is_rejected():
    pool = make_pool()
    (slot,) = pool.allocate(1)
    with pytest.raises(ValueError, match="more than once"):
        pool.free([slot, slot])
    assert pool.num_used_slots == 1


@pytest.mark.parametrize("slot", [0, 5, -1])
def test_free_of_null_or_foreign_slot_is_rejected(slot):
    pool = make_pool(num_slots=4)
    pool.allocate(4)
    with pytest.raises(ValueError, match="not a slot of this pool"):
        pool.free([slot])


def test_allocated_slot_is_zeroed_and_other_slots_untouched():
    pool = make_pool(num_slots=3)
    slots = pool.allocate(3)
    for tensor in (pool.conv["kda"], pool.recurrent["kda"], pool.conv["conv"]):
        tensor.fill_(1e30)
    pool.free([slots[1]])
    (again,) = pool.allocate(1)
    assert again == slots[1]
    for tensor in (pool.conv["kda"], pool.recurrent["kda"], pool.conv["conv"]):
        assert torch.all(tensor[:, again] == 0)
        others = [s for s in range(4) if s != again]
        assert torch.all(tensor[:, others] == 1e30)


def test_layer_state_views_alias_the_pool():
    pool = make_pool()
    conv, recurrent = pool.layer_state("kda", 2)
    conv[3].fill_(7.0)
    recurrent[3, 1].fill_(5.0)
    assert torch.all(pool.conv["kda"][2, 3] == 7.0)
    assert torch.all(pool.recurrent["kda"][2, 3, 1] == 5.0)
    assert torch.all(pool.conv["kda"][1] == 0) and torch.all(pool.recurrent["kda"][2, 3, 0] == 0)
    assert pool.layer_state("conv", 0).recurrent_state is None


@pytest.mark.parametrize("conv_layout", ["SD", "DS"])
def test_conv_parts_are_q_k_v_views_by_size(conv_layout):
    pool = make_pool(conv_layout=conv_layout)
    conv = pool.layer_state("kda", 0).conv_state  # [slots + 1, ...]
    conv.copy_(torch.randn(conv.shape))
    q, k, v = pool.conv_parts("kda", conv[1])
    channels = conv[1] if conv_layout == "DS" else conv[1].T  # [48, state_len]
    assert torch.equal(q, channels[0:8] if conv_layout == "DS" else channels[0:8].T)
    assert torch.equal(k, channels[8:16] if conv_layout == "DS" else channels[8:16].T)
    assert torch.equal(v, channels[16:48] if conv_layout == "DS" else channels[16:48].T)
    v.fill_(3.0)  # a view: writes land in the pool
    assert torch.all(pool.conv_parts("kda", pool.conv["kda"][0, 1])[2] == 3.0)
    # With leading dims: all slots of one layer at once.
    parts = pool.conv_parts("kda", conv)
    assert [p.shape[1 + pool.groups["kda"].layout.conv_channel_axis] for p in parts] == [8, 8, 32]


def test_bytes_total_counts_every_tensor():
    pool = make_pool(num_slots=4)
    expected = 3 * 5 * (3 * 48 + 4 * 8 * 4) * 4 + 2 * 5 * 2 * 16 * 4
    assert pool.bytes_total == expected
