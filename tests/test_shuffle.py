"""gptq_shuffle re-lays weights exactly as documented: rows reordered by the permutation."""

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
    assert np.array_equal(q, pack.permute_rows(t.qweight, perm, bits))
    assert not np.array_equal(q, t.qweight)


def test_shuffle_without_permutation_leaves_weights_alone():
    t = pack.random_gptq(128, 32, 4, 32, rng=1)
    for no_perm in (None, np.zeros((0,), np.int32)):
        q = t.qweight.copy()
        opt4gptq.gptq_shuffle(q, no_perm, 4)
        assert np.array_equal(q, t.qweight)


def test_shuffle_with_vllm_033_meta_tensor_is_a_no_op():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    t = pack.random_gptq(128, 32, 4, 32, rng=2)
    q = torch.from_numpy(t.qweight.copy())
    opt4gptq.gptq_shuffle(q, torch.empty((1, 1), device="meta"), 4)
    assert np.array_equal(q.numpy(), t.qweight)


def test_shuffle_rejects_a_non_permutation():
    t = pack.random_gptq(128, 32, 4, 32, act_order=True, rng=3)
    q = t.qweight.copy()
    with pytest.raises(ValueError, match="q_perm must be a permutation"):
        opt4gptq.gptq_shuffle(q, t.g_idx, 4)  # g_idx itself, not argsort(g_idx)
    assert np.array_equal(q, t.qweight), "a refused shuffle must not touch the weights"
