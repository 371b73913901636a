"""causal_conv1d_fn / causal_conv1d_update on a slot pool vs transformers' per-sequence Kimi-Linear conv."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err
from transformers.models.kimi_linear import modeling_kimi_linear as tf

from deltaserve.ops.conv1d import causal_conv1d_fn, causal_conv1d_update

D, K, NUM_SLOTS = 24, 4, 6


def nan_pool(state_len: int, used: dict[int, bool]) -> torch.Tensor:
    """``[NUM_SLOTS+1, L, D]`` filled with NaN; slots in ``used`` get a random state (True) or zeros (False)."""
    pool = torch.full((NUM_SLOTS + 1, state_len, D), float("nan"))
    for slot, random_state in used.items():
        pool[slot] = torch.randn(state_len, D) if random_state else 0.0
    return pool


def last_inputs(history: torch.Tensor, new: torch.Tensor, state_len: int) -> torch.Tensor:
    """The last ``state_len`` rows of ``[history; new]``, zero-padded in front (written independently of the op)."""
    rows = torch.cat([history, new], dim=0)[-state_len:]
    return torch.cat([rows.new_zeros(state_len - rows.shape[0], D), rows], dim=0)


def run_prefill(lengths, slots, has_init, state_len, random_state=True):
    pool = nan_pool(state_len, {s: random_state for s in slots})
    before = pool.clone()
    weight = torch.randn(D, K)
    x = torch.randn(sum(lengths), D)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out = causal_conv1d_fn(
        x, weight, pool, cu, torch.tensor(slots, dtype=torch.int32), torch.tensor(has_init), activation="silu"
    )
    return x, weight, cu, before, pool, out


def expected_sequence(x_b, weight, history):
    """transformers' causal_conv1d_update on one sequence (it takes several tokens), states in DS order."""
    state = history.t().unsqueeze(0).clone()  # [1, D, L]
    out = tf.causal_conv1d_update(x_b.t().unsqueeze(0), state, weight, activation="silu")
    return out[0].t(), state[0].t()


def test_prefill_from_scratch_matches_transformers_conv():
    lengths, slots = [1, 3, 7, 20], [2, 5, 1, 4]
    x, weight, cu, _, pool, out = run_prefill(lengths, slots, [False] * 4, K - 1)
    for b, slot in enumerate(slots):
        x_b = x[cu[b] : cu[b + 1]]
        expected = tf.causal_conv1d_fn(x_b.t().unsqueeze(0), weight, activation="silu")[0].t()
        assert rel_err(out[cu[b] : cu[b + 1]], expected) < 1e-6
        assert torch.equal(pool[slot], last_inputs(x_b.new_zeros(0, D), x_b, K - 1))


def test_prefill_continuation_reads_initial_window():
    lengths, slots, has_init = [1, 2, 7, 20], [3, 6, 1, 2], [True, True, True, False]
    x, weight, cu, before, pool, out = run_prefill(lengths, slots, has_init, K - 1)
    for b, slot in enumerate(slots):
        history = before[slot] if has_init[b] else torch.zeros(K - 1, D)
        exp_out, exp_state = expected_sequence(x[cu[b] : cu[b + 1]], weight, history)
        assert rel_err(out[cu[b] : cu[b + 1]], exp_out) < 1e-6
        assert rel_err(pool[slot], exp_state) < 1e-6


def test_unused_slots_stay_untouched_and_outputs_finite():
    slots = [5, 2]
    x, weight, cu, before, pool, out = run_prefill([4, 9], slots, [True, False], K - 1)
    for slot in set(range(NUM_SLOTS + 1)) - set(slots):
        assert pool[slot].isnan().all()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("num_spec", [1, 3])
def test_state_keeps_last_state_len_inputs_with_spec_slots(num_spec):
    state_len = K - 1 + num_spec
    lengths, slots, has_init = [1, 2, 9, 4], [1, 2, 3, 4], [True, False, True, True]
    x, weight, cu, before, pool, out = run_prefill(lengths, slots, has_init, state_len)
    for b, slot in enumerate(slots):
        x_b = x[cu[b] : cu[b + 1]]
        history = before[slot] if has_init[b] else torch.zeros(state_len, D)
        assert torch.equal(pool[slot], last_inputs(history, x_b, state_len))
        # only the newest K-1 rows of the old state feed the conv
        exp_out, _ = expected_sequence(x_b, weight, history[-(K - 1) :])
        assert rel_err(out[cu[b] : cu[b + 1]], exp_out) < 1e-6


def test_padding_rows_on_null_slot_do_not_touch_other_slots():
    slots = [3, 0, 0]
    x, weight, cu, before, pool, out = run_prefill([5, 2, 1], slots, [False, False, False], K - 1)
    for slot in (1, 2, 4, 5, 6):
        assert pool[slot].isnan().all()
    expected = tf.causal_conv1d_fn(x[:5].t().unsqueeze(0), weight, activation="silu")[0].t()
    assert rel_err(out[:5], expected) < 1e-6


@pytest.mark.parametrize("num_spec", [0, 2])
def test_decode_update_matches_transformers_update(num_spec):
    state_len = K - 1 + num_spec
    slots = [4, 1, 6]
    pool = nan_pool(state_len, {s: True for s in slots})
    before = pool.clone()
    weight, x = torch.randn(D, K), torch.randn(len(slots), D)
    out = causal_conv1d_update(x, weight, pool, torch.tensor(slots, dtype=torch.int32), activation="silu")
    for b, slot in enumerate(slots):
        exp_out, exp_state = expected_sequence(x[b : b + 1], weight, before[slot])
        assert rel_err(out[b : b + 1], exp_out) < 1e-6
        assert torch.equal(pool[slot], exp_state)
    for slot in set(range(NUM_SLOTS + 1)) - set(slots):
        assert pool[slot].isnan().all()


def test_ds_pool_view_is_updated_in_place():
    # a DS pool [slots+1, D, L]; the op gets its SD view
    pool_ds = torch.full((NUM_SLOTS + 1, D, K - 1), float("nan"))
    pool_ds[2] = torch.randn(D, K - 1)
    history = pool_ds[2].t().clone()
    weight, x = torch.randn(D, K), torch.randn(6, D)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    slot = torch.tensor([2], dtype=torch.int32)
    out = causal_conv1d_fn(x, weight, pool_ds.transpose(-1, -2), cu, slot, torch.tensor([True]))
    exp_out, exp_state = expected_sequence(x, weight, history)
    assert rel_err(out, exp_out) < 1e-6
    assert torch.equal(pool_ds[2], exp_state.t())
    step = torch.randn(1, D)
    out = causal_conv1d_update(step, weight, pool_ds.transpose(-1, -2), slot)
    exp_out, exp_state = expected_sequence(step, weight, exp_state)
    assert rel_err(out, exp_out) < 1e-6
    assert torch.equal(pool_ds[2], exp_state.t())
    assert pool_ds[1].isnan().all() and pool_ds[3:].isnan().all()


def test_wrong_state_width_names_the_tensor():
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(torch.randn(1, D), torch.randn(D, K), torch.zeros(3, K - 1, D + 1), torch.tensor([1]))
