"""gptq_shuffle re-lays weights exactly as documented: rows reordered by the
permutation, and 4-bit packs in the tensor-core pack order (pack.shuffle)."""

import numpy as np
import pytest

import opt4gptq
from opt4gptq import pack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_shuffle_reorders_rows(bits):
    rng = np.random.default_rng()
    t = pack.random_gptq(256, 48 if bits != 3 else 64, bits, 64, act_order=True, rng=rng)
    perm = np.argsort(t.g_idx, kind="stable").astype(np.int32)
    q = t.qweight.copy()
    opt4gptq.gptq_shuffle(q, perm, bits)
    assert np.array_equal(q, pack.shuffle(t.qweight, perm, bits))
    assert not np.array_equal(q, t.qweight)
    assert np.array_equal(pack.unshuffle(q, perm, bits), t.qweight)


def test_shuffle_order_of_4_bit_packs_against_its_definition():
    """Stream position 8t + j of a pack holds row 16 (j % 2) + 8 ((j / 2) % 2) + 2t + j / 4,
    written out per element here, independently of pack.shuffle."""
    t = pack.random_gptq(64, 16, 4, 32, rng=4)
    q = t.qweight.copy()
    opt4gptq.gptq_shuffle(q, None, 4)
    values = pack.unpack_rows(t.qweight, 4)
    words = q.view(np.uint32)
    for pack_index in range(2):
        for t_row in range(4):
            for j in range(8):
                row = 32 * pack_index + 16 * (j % 2) + 8 * ((j // 2) % 2) + 2 * t_row + j // 4
                nibbles = (words[4 * pack_index + t_row] >> np.uint32(4 * j)) & np.uint32(15)
                assert np.array_equal(nibbles, values[row])


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_shuffle_without_permutation_leaves_other_widths_alone(bits):
    t = pack.random_gptq(128, 32 if bits != 3 else 64, bits, 32, rng=1)
    for no_perm in (None, np.zeros((0,), np.int32)):
        q = t.qweight.copy()
        opt4gptq.gptq_shuffle(q, no_perm, bits)
        assert np.array_equal(q, t.qweight)


def test_shuffle_without_permutation_still_orders_4_bit_packs():
    t = pack.random_gptq(128, 32, 4, 32, rng=1)
    for no_perm in (None, np.zeros((0,), np.int32)):
        q = t.qweight.copy()
        opt4gptq.gptq_shuffle(q, no_perm, 4)
        assert np.array_equal(q, pack.shuffle(t.qweight, None, 4))
        assert not np.array_equal(q, t.qweight)


def test_shuffle_with_vllm_033_meta_tensor_means_no_permutation():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    t = pack.random_gptq(128, 32, 4, 32, rng=2)
    q = torch.from_numpy(t.qweight.copy())
    opt4gptq.gptq_shuffle(q, torch.empty((1, 1), device="meta"), 4)
    assert np.array_equal(q.numpy(), pack.shuffle(t.qweight, None, 4))


def test_shuffle_rejects_a_non_permutation():
    t = pack.random_gptq(128, 32, 4, 32, act_order=True, rng=3)
    q = t.qweight.copy()
    with pytest.raises(ValueError, match="q_perm must be a permutation"):
        opt4gptq.gptq_shuffle(q, t.g_idx, 4)  # g_idx itself, not argsort(g_idx)
    assert np.array_equal(q, t.qweight), "a refused shuffle must not touch the weights"
