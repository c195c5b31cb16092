"""Tests for opt4gptq.pack, the numpy reference of the GPTQ tensor format."""

import importlib.util
import pathlib
import sys
import time

import numpy as np
import pytest

try:
    from opt4gptq import pack
except ImportError:  # package __init__ may need a compiled module not built yet
    _path = pathlib.Path(__file__).resolve().parents[1] / "python" / "opt4gptq" / "pack.py"
    _spec = importlib.util.spec_from_file_location("opt4gptq_pack", _path)
    pack = importlib.util.module_from_spec(_spec)
    sys.modules["opt4gptq_pack"] = pack
    _spec.loader.exec_module(pack)

BITS = [2, 3, 4, 8]


# ---------------------------------------------------------------------------
# slow, independent per-element references
# ---------------------------------------------------------------------------


def slow_extract(words_u32, idx, bits):
    """Value idx of a little-endian bit stream held in a list of 32-bit ints."""
    word, off = (idx * bits) // 32, (idx * bits) % 32
    value = words_u32[word] >> off
    if off + bits > 32:
        value |= words_u32[word + 1] << (32 - off)
    return value & ((1 << bits) - 1)


def slow_unpack_rows(qweight, bits):
    rows, n = qweight.shape
    k = rows * 32 // bits
    out = np.zeros((k, n), dtype=np.int64)
    for col in range(n):
        words = [int(x) & 0xFFFFFFFF for x in qweight[:, col]]
        for i in range(k):
            out[i, col] = slow_extract(words, i, bits)
    return out


def slow_unpack_cols(qzeros, bits):
    return slow_unpack_rows(qzeros.T, bits).T


def slow_dequantize(t):
    q = slow_unpack_rows(t.qweight, t.bits)
    z = slow_unpack_cols(t.qzeros, t.bits)
    k, n = q.shape
    out = np.zeros((k, n))
    for i in range(k):
        g = int(t.g_idx[i])
        for j in range(n):
            zz = int(z[g, j]) + (0 if t.v2 else 1)
            out[i, j] = float(t.scales[g, j]) * (int(q[i, j]) - zz)
    return out


# ---------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [32, 64, 96])
def test_pack_rows_round_trip(bits, k):
    rng = np.random.default_rng(k * 10 + bits)
    vals = rng.integers(0, 1 << bits, size=(k, 7))
    packed = pack.pack_rows(vals, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (k * bits // 32, 7)
    np.testing.assert_array_equal(pack.unpack_rows(packed, bits), vals)
    np.testing.assert_array_equal(slow_unpack_rows(packed, bits), vals)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [32, 64, 96])
def test_pack_cols_round_trip(bits, n):
    rng = np.random.default_rng(n * 10 + bits + 1)
    vals = rng.integers(0, 1 << bits, size=(5, n))
    packed = pack.pack_cols(vals, bits)
    assert packed.dtype == np.int32
    assert packed.shape == (5, n * bits // 32)
    np.testing.assert_array_equal(pack.unpack_cols(packed, bits), vals)
    np.testing.assert_array_equal(slow_unpack_cols(packed, bits), vals)
    # packing along axis 1 is packing the transpose along axis 0
    np.testing.assert_array_equal(packed, pack.pack_rows(vals.T, bits).T)


@pytest.mark.parametrize("bits", BITS)
def test_slow_reader_on_random_words(bits):
    """unpack of arbitrary 32-bit words (sign bit included) matches the slow
    bit reader, and re-packing gives back the same words."""
    rng = np.random.default_rng(bits)
    words = rng.integers(-(1 << 31), 1 << 31, size=(bits * 2, 3)).astype(np.int32)
    vals = pack.unpack_rows(words, bits)
    np.testing.assert_array_equal(vals, slow_unpack_rows(words, bits))
    np.testing.assert_array_equal(pack.pack_rows(vals, bits), words)
    # uint32 input holding the same bit patterns decodes identically
    np.testing.assert_array_equal(pack.unpack_rows(words.view(np.uint32), bits), vals)
    cols = pack.unpack_cols(words.T, bits)
    np.testing.assert_array_equal(cols, slow_unpack_cols(words.T, bits))


def test_known_4bit():
    vals = np.arange(8).reshape(8, 1)
    packed = pack.pack_rows(vals, 4)
    assert packed.shape == (1, 1)
    assert int(packed[0, 0]) == 0x76543210
    vals = np.array([[15, 14, 13, 12, 11, 10, 9, 8]])
    packed = pack.pack_cols(vals, 4)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0x89ABCDEF
    assert int(packed[0, 0]) == 0x89ABCDEF - (1 << 32)  # sign bit set


def test_known_3bit_straddle():
    vals = np.zeros((32, 2), dtype=np.int64)
    vals[10, 0] = 7  # stream bits 30, 31, 32
    vals[21, 1] = 7  # stream bits 63, 64, 65
    packed = pack.pack_rows(vals, 3)
    assert packed.shape == (3, 2)
    u = packed.view(np.uint32)
    assert [int(x) for x in u[:, 0]] == [0xC0000000, 0x1, 0x0]
    assert [int(x) for x in u[:, 1]] == [0x0, 0x80000000, 0x3]
    np.testing.assert_array_equal(pack.unpack_rows(packed, 3), vals)
    # value 10 = 0b101 -> bit 30 of word 0 and bit 0 of word 1
    vals[10, 0] = 5
    u = pack.pack_rows(vals, 3).view(np.uint32)
    assert int(u[0, 0]) == 0x40000000 and int(u[1, 0]) == 0x1


def test_known_8bit_and_2bit():
    assert int(pack.pack_rows(np.array([[1], [2], [3], [255]]), 8)[0, 0]) & 0xFFFFFFFF == 0xFF030201
    assert int(pack.pack_rows(np.full((16, 1), 3), 2)[0, 0]) == -1
    assert int(pack.pack_rows(np.array([[1]] + [[0]] * 15), 2)[0, 0]) == 1


def test_unpack_k_argument():
    vals = np.arange(16).reshape(16, 1) % 4
    packed = pack.pack_rows(vals, 2)
    np.testing.assert_array_equal(pack.unpack_rows(packed, 2, k=16), vals)
    np.testing.assert_array_equal(pack.unpack_rows(packed, 2, k=10), vals[:10])
    with pytest.raises(ValueError, match="k"):
        pack.unpack_rows(packed, 2, k=17)
    with pytest.raises(ValueError, match="n"):
        pack.unpack_cols(packed.T, 2, n=0)


def test_pack_speed_4096():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 16, size=(4096, 4096))
    t0 = time.perf_counter()
    packed = pack.pack_rows(vals, 4)
    back = pack.unpack_rows(packed, 4)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(back, vals)
    assert elapsed < 3.0  # generous; typically well under a second


# ---------------------------------------------------------------------------
# dequantize / reference gemm / containers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_slow(bits, v2, act_order):
    t = pack.random_gptq(64, 32, bits, group_size=16, act_order=act_order, v2=v2, rng=bits)
    w = t.dequantize()
    assert w.dtype == np.float64 and w.shape == (64, 32)
    np.testing.assert_array_equal(w, slow_dequantize(t))
    np.testing.assert_array_equal(
        w, pack.dequantize(t.qweight, t.qzeros, t.scales, t.g_idx, bits, v2=v2))


def test_dequantize_default_g_idx():
    t = pack.random_gptq(64, 32, 4, group_size=32, rng=1)
    np.testing.assert_array_equal(
        pack.dequantize(t.qweight, t.qzeros, t.scales, None, 4), t.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_v1_extreme_stored_zero(bits):
    top = (1 << bits) - 1
    q = np.arange(32 * 32).reshape(32, 32) % (top + 1)
    qweight = pack.pack_rows(q, bits)
    qzeros = pack.pack_cols(np.full((1, 32), top), bits)
    scales = np.ones((1, 32), dtype=np.float16)
    w1 = pack.dequantize(qweight, qzeros, scales, None, bits, v2=False)
    np.testing.assert_array_equal(w1, q - (1 << bits))  # z = 2**bits
    w2 = pack.dequantize(qweight, qzeros, scales, None, bits, v2=True)
    np.testing.assert_array_equal(w2, q - top)


def test_reference_gemm():
    t = pack.random_gptq(64, 32, 3, group_size=32, act_order=True, rng=5)
    a = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float16)
    out = pack.reference_gemm(a, t.qweight, t.qzeros, t.scales, t.g_idx, 3)
    assert out.shape == (4, 32) and out.dtype == np.float64
    np.testing.assert_allclose(out, a.astype(np.float64) @ slow_dequantize(t), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="a must"):
        pack.reference_gemm(a[:, :32], t.qweight, t.qzeros, t.scales, t.g_idx, 3)


@pytest.mark.parametrize("bits", BITS)
def test_random_gptq_full_range(bits):
    t = pack.random_gptq(256, 128, bits, group_size=32, rng=bits)
    top = (1 << bits) - 1
    q = pack.unpack_rows(t.qweight, bits)
    z = pack.unpack_cols(t.qzeros, bits)
    assert q.min() == 0 and q.max() == top
    assert z.min() == 0 and z.max() == top
    assert t.qweight.shape == (256 * bits // 32, 128) and t.qweight.dtype == np.int32
    assert t.qzeros.shape == (8, 128 * bits // 32) and t.qzeros.dtype == np.int32
    assert t.scales.shape == (8, 128) and t.scales.dtype == np.float16
    assert t.g_idx.shape == (256,) and t.g_idx.dtype == np.int32
    assert np.all(t.scales > 0)
    assert (t.k, t.n, t.num_groups) == (256, 128, 8)


def test_random_gptq_one_group():
    t = pack.random_gptq(64, 32, 4, group_size=-1, rng=0)
    assert t.scales.shape == (1, 32)
    assert np.all(t.g_idx == 0)


# ---------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------


def _check_quantize_error(weight, t):
    w = t.dequantize()
    s = t.scales.astype(np.float64)[t.g_idx]
    err = np.abs(w - weight)
    assert np.all(err <= s / 2 * (1 + 1e-9) + 1e-12), float(np.max(err / s))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_quantize_error_bound(bits, v2, act_order, group_size):
    rng = np.random.default_rng(bits * 7 + v2 + 2 * act_order)
    weight = rng.standard_normal((128, 64)) * 0.02
    # adversarial columns: all positive, all negative, all zero, constant
    weight[:, 0] = np.abs(weight[:, 0]) + 0.01
    weight[:, 1] = -np.abs(weight[:, 1]) - 0.01
    weight[:, 2] = 0.0
    weight[:, 3] = 0.125
    weight[:, 4] = -3.5
    weight[:, 5] = np.abs(weight[:, 5])
    weight[:, 5][::3] = -1e-6  # tiny negatives: raw zero point rounds to 0
    t = pack.quantize(weight, bits, group_size=group_size, act_order=act_order, v2=v2, rng=3)
    assert t.bits == bits and t.v2 == v2 and t.group_size == group_size
    assert t.qweight.dtype == np.int32 and t.qzeros.dtype == np.int32
    assert t.scales.dtype == np.float16 and t.g_idx.dtype == np.int32
    groups = 1 if group_size == -1 else 128 // group_size
    assert t.scales.shape == (groups, 64)
    assert np.all(t.scales > 0)
    _check_quantize_error(weight, t)
    z = pack.unpack_cols(t.qzeros, bits) + (0 if v2 else 1)
    assert z.min() >= (0 if v2 else 1) and z.max() <= (1 << bits) - 1
    # the scales are as tight as min/max (plus fp16 rounding) for normal columns
    if group_size == -1:
        col = weight[:, 10]
        tight = (max(col.max(), 0) - min(col.min(), 0)) / ((1 << bits) - 1)
        assert tight <= float(t.scales[0, 10]) <= tight * (1 + 2 ** -9)


def test_quantize_all_zero_weight_is_exact():
    t = pack.quantize(np.zeros((64, 32)), 4, group_size=32)
    np.testing.assert_array_equal(t.dequantize(), 0.0)
    assert np.all(np.isfinite(t.scales.astype(np.float64)))


def test_quantize_group_layout():
    t = pack.quantize(np.random.default_rng(0).standard_normal((128, 32)), 4, group_size=32)
    np.testing.assert_array_equal(t.g_idx, np.arange(128) // 32)


@pytest.mark.parametrize("fn", ["quantize", "random_gptq"])
def test_act_order_g_idx(fn):
    def make(seed):
        if fn == "quantize":
            w = np.random.default_rng(0).standard_normal((256, 32))
            return pack.quantize(w, 4, group_size=64, act_order=True, rng=seed)
        return pack.random_gptq(256, 32, 4, group_size=64, act_order=True, rng=seed)

    t = make(11)
    assert t.g_idx.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(t.g_idx), [64] * 4)
    assert not np.array_equal(t.g_idx, np.arange(256) // 64)
    np.testing.assert_array_equal(make(11).g_idx, t.g_idx)  # seed reproducible
    # a Generator is accepted as well as a seed, and gives the same permutation
    np.testing.assert_array_equal(make(np.random.default_rng(11)).g_idx, t.g_idx)


def test_act_order_perm_definition():
    """g_idx[perm[i]] = i // group_size for the permutation drawn from rng."""
    t = pack.random_gptq(128, 32, 4, group_size=32, act_order=True, rng=np.random.default_rng(4))
    perm = np.random.default_rng(4).permutation(128)
    np.testing.assert_array_equal(t.g_idx[perm], np.arange(128) // 32)


def test_quantize_act_order_groups_use_own_rows():
    """Each group's scale is computed over its own (permuted) row set."""
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((128, 32)) * 0.01
    t = pack.quantize(weight, 8, group_size=32, act_order=True, rng=9)
    for g in range(4):
        rows = weight[t.g_idx == g]
        tight = (np.maximum(rows.max(0), 0) - np.minimum(rows.min(0), 0)) / 255
        s = t.scales[g].astype(np.float64)
        assert np.all(s >= tight) and np.all(s <= tight * (1 + 2 ** -9))


# ---------------------------------------------------------------------------
# permute_rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_permute_rows(bits):
    rng = np.random.default_rng(bits)
    vals = rng.integers(0, 1 << bits, size=(96, 8))
    qweight = pack.pack_rows(vals, bits)
    perm = rng.permutation(96)
    out = pack.permute_rows(qweight, perm, bits)
    assert out.dtype == np.int32 and out.shape == qweight.shape
    np.testing.assert_array_equal(out, pack.pack_rows(pack.unpack_rows(qweight, bits)[perm], bits))
    np.testing.assert_array_equal(pack.unpack_rows(out, bits), vals[perm])
    np.testing.assert_array_equal(pack.permute_rows(qweight, np.arange(96), bits), qweight)


def test_permute_rows_bad_perm():
    qweight = pack.pack_rows(np.zeros((32, 4), dtype=np.int64), 4)
    for bad in (np.arange(31), np.r_[np.arange(31), 0], np.arange(1, 33),
                np.arange(32).astype(float), np.arange(32).reshape(4, 8)):
        with pytest.raises(ValueError, match="perm"):
            pack.permute_rows(qweight, bad, 4)


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------


def test_bad_bits():
    vals = np.zeros((32, 32), dtype=np.int64)
    for bad in (5, 1, 16, 0, True, 4.0, "4"):
        with pytest.raises(ValueError, match="bits"):
            pack.pack_rows(vals, bad)
    with pytest.raises(ValueError, match="bits"):
        pack.unpack_cols(np.zeros((1, 4), np.int32), 6)
    with pytest.raises(ValueError, match="bits"):
        pack.quantize(np.zeros((32, 32)), 5)


def test_bad_values():
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.full((32, 1), 16), 4)
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.full((32, 1), -1), 4)
    with pytest.raises(ValueError, match="values"):
        pack.pack_cols(np.full((1, 32), 4), 2)
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.full((32, 1), 0.5), 4)
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.zeros(32, dtype=np.int64), 4)  # 1-D
    # integral floats are accepted
    np.testing.assert_array_equal(pack.pack_rows(np.full((8, 1), 1.0), 4),
                                  pack.pack_rows(np.full((8, 1), 1), 4))


def test_bad_shapes():
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.zeros((16, 2), dtype=np.int64), 3)  # 48 bits
    with pytest.raises(ValueError, match="values"):
        pack.pack_rows(np.zeros((4, 2), dtype=np.int64), 4)  # 16 bits
    with pytest.raises(ValueError, match="values"):
        pack.pack_cols(np.zeros((2, 40), dtype=np.int64), 3)
    with pytest.raises(ValueError, match="qweight"):
        pack.unpack_rows(np.zeros((4, 2), np.int32), 3)  # 4 words != 3*m
    with pytest.raises(ValueError, match="qweight"):
        pack.unpack_rows(np.zeros((4, 2), np.float32), 4)
    with pytest.raises(ValueError, match="group_size"):
        pack.quantize(np.zeros((96, 32)), 4, group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        pack.random_gptq(96, 32, 4, group_size=0)
    with pytest.raises(ValueError, match="weight"):
        pack.quantize(np.zeros((48, 32)), 3, group_size=-1)
    with pytest.raises(ValueError, match="weight"):
        pack.quantize(np.full((32, 32), np.nan), 4, group_size=-1)


def test_bad_dequantize_args():
    t = pack.random_gptq(64, 32, 4, group_size=32, rng=0)
    with pytest.raises(ValueError, match="g_idx"):
        pack.dequantize(t.qweight, t.qzeros, t.scales, np.full(64, 2), 4)
    with pytest.raises(ValueError, match="g_idx"):
        pack.dequantize(t.qweight, t.qzeros, t.scales, t.g_idx[:32], 4)
    with pytest.raises(ValueError, match="scales"):
        pack.dequantize(t.qweight, t.qzeros, t.scales[:, :16], t.g_idx, 4)
    with pytest.raises(ValueError, match="qzeros"):
        pack.dequantize(t.qweight, t.qzeros[:1], t.scales, t.g_idx, 4)


def test_all_exported():
    for name in pack.__all__:
        assert hasattr(pack, name)
    for name in ("pack_rows", "unpack_rows", "pack_cols", "unpack_cols", "GPTQTensors",
                 "quantize", "random_gptq", "dequantize", "reference_gemm", "permute_rows"):
        assert name in pack.__all__
