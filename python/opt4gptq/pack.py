"""Pure-numpy reference implementation of the GPTQ packed tensor format.

This module is the ground truth the rest of opt4gptq is tested against: it
packs and unpacks GPTQ ``qweight`` / ``qzeros`` tensors, dequantizes them,
computes reference GEMMs, builds quantized tensors from float weights and
generates random quantized tensors for tests.

Format (``bits`` b in {2, 3, 4, 8}, K input rows, N output columns, G groups):

* ``qweight`` int32 ``[K*b/32, N]``.  For every column independently the
  quantized values ``q[k, n]`` (``0 <= q < 2**b``) form a little-endian bit
  stream along axis 0: value k occupies stream bits ``[k*b, k*b + b)``, where
  bit j of word ``qweight[w, n]`` is stream bit ``32*w + j``.  With b = 3,
  values 10 and 21 of every 32-row block straddle two words.
* ``qzeros`` int32 ``[G, N*b/32]``: the stored zero points, packed the same
  way but along axis 1 (one bit stream per group row).
* ``scales`` float16 ``[G, N]``.
* ``g_idx`` int32 ``[K]``: the group of each input row.
* ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``;
  ``z = stored_zero + 1`` in the (original) v1 format, so a stored zero of
  ``2**b - 1`` is legal and means ``z = 2**b``; ``z = stored_zero`` in v2.

Everything is vectorized with numpy; the only Python loops run over the
(at most 32) value positions inside one packing period, never over elements.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "SUPPORTED_BITS",
    "GPTQTensors",
    "pack_rows",
    "unpack_rows",
    "pack_cols",
    "unpack_cols",
    "dequantize",
    "reference_gemm",
    "quantize",
    "random_gptq",
    "permute_rows",
    "TENSOR_CORE_PACK_ORDER",
    "shuffle",
    "unshuffle",
]

#: Bit widths of the GPTQ format handled here.
SUPPORTED_BITS = (2, 3, 4, 8)

_WORD_MASK = np.uint64(0xFFFFFFFF)

# Smallest positive float16 (a subnormal, 2**-24).  Used as the floor for
# quantization scales: it keeps the stored scale non-zero (so w / scale is
# finite, even for all-zero groups) without coarsening small but legitimate
# scales, which a larger floor such as 1e-5 would do for 8-bit groups.
_MIN_SCALE = float(np.finfo(np.float16).smallest_subnormal)
_MAX_SCALE = float(np.finfo(np.float16).max)


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _check_bits(bits) -> int:
    """Return ``bits`` as an int, or raise ValueError if unsupported."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"bits must be an integer in {SUPPORTED_BITS}, got {bits!r}")
    bits = int(bits)
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def _period(bits: int):
    """(values, words) per packing period: the smallest whole number of
    values that fills a whole number of 32-bit words (32/3 for 3 bits)."""
    values = 32 // math.gcd(bits, 32)
    return values, values * bits // 32


def _as_int_values(values, name: str, bits: int) -> np.ndarray:
    """Validate a 2-D array of quantized values and return it as uint64.

    Integer arrays are accepted, as are float arrays holding only integral
    values (e.g. the output of ``np.round``)."""
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integers")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(
                f"{name} must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
                f"got values in [{lo}, {hi}]"
            )
    return arr.astype(np.uint64)


def _as_words(packed, name: str) -> np.ndarray:
    """Validate a 2-D array of packed 32-bit words (int32, uint32 or any
    integer type holding 32-bit patterns) and return it as uint64 words."""
    arr = np.asarray(packed)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype == np.int32:
        return arr.view(np.uint32).astype(np.uint64)
    if arr.size:
        if arr.min() < -(1 << 31) or arr.max() >= (1 << 32):
            raise ValueError(f"{name} holds values that are not 32-bit words")
    return (arr.astype(np.int64) & 0xFFFFFFFF).astype(np.uint64)


def _check_count(count, name: str) -> int:
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {count!r}")
    count = int(count)
    if count < 0:
        raise ValueError(f"{name} must be non-negative, got {count}")
    return count


# ---------------------------------------------------------------------------
# bit-stream packing along axis 0 (no validation; callers validate)
# ---------------------------------------------------------------------------


def _pack_axis0(vals: np.ndarray, bits: int) -> np.ndarray:
    """uint64 values [K, N] -> int32 words [K*bits/32, N]."""
    k, n = vals.shape
    pv, pw = _period(bits)
    blocks = k // pv
    v3 = vals.reshape(blocks, pv, n)
    out = np.zeros((blocks, pw, n), dtype=np.uint64)
    for i in range(pv):
        word, off = divmod(i * bits, 32)
        out[:, word] |= v3[:, i] << np.uint64(off)
        if off + bits > 32:  # straddles into the next word
            out[:, word + 1] |= v3[:, i] >> np.uint64(32 - off)
    out &= _WORD_MASK
    return out.astype(np.uint32).reshape(blocks * pw, n).view(np.int32)


def _unpack_axis0(words: np.ndarray, bits: int) -> np.ndarray:
    """uint64 words [W, N] (W a multiple of the period's words) -> int32
    values [W*32/bits, N]."""
    w, n = words.shape
    pv, pw = _period(bits)
    blocks = w // pw
    w3 = words.reshape(blocks, pw, n)
    out = np.empty((blocks, pv, n), dtype=np.uint64)
    mask = np.uint64((1 << bits) - 1)
    for i in range(pv):
        word, off = divmod(i * bits, 32)
        val = w3[:, word] >> np.uint64(off)
        if off + bits > 32:
            val |= w3[:, word + 1] << np.uint64(32 - off)
        out[:, i] = val & mask
    return out.reshape(blocks * pv, n).astype(np.int32)


# ---------------------------------------------------------------------------
# public packing API
# ---------------------------------------------------------------------------


def pack_rows(values, bits: int) -> np.ndarray:
    """Pack quantized values [K, N] along K into a GPTQ ``qweight``.

    Returns int32 ``[K*bits/32, N]``; each column is a little-endian bit
    stream (value k in stream bits ``[k*bits, k*bits + bits)``).  Raises
    ValueError for unsupported ``bits``, out-of-range ``values`` or a K that
    does not fill whole 32-bit words."""
    bits = _check_bits(bits)
    vals = _as_int_values(values, "values", bits)
    k = vals.shape[0]
    if (k * bits) % 32:
        raise ValueError(
            f"values has K={k} rows; K*bits must be a multiple of 32 (bits={bits})"
        )
    return _pack_axis0(vals, bits)


def unpack_rows(qweight, bits: int, k: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`pack_rows`: ``qweight`` [W, N] -> int32 values [K, N].

    ``k`` defaults to ``W*32/bits``; if given it must need exactly W words
    (``ceil(k*bits/32) == W``) and the first k values are returned."""
    bits = _check_bits(bits)
    words = _as_words(qweight, "qweight")
    w = words.shape[0]
    if (w * 32) % bits:
        raise ValueError(
            f"qweight has {w} rows, which do not hold a whole number of "
            f"{bits}-bit values (rows*32 must be a multiple of bits)"
        )
    capacity = w * 32 // bits
    if k is None:
        k = capacity
    k = _check_count(k, "k")
    if -(-k * bits // 32) != w:
        raise ValueError(f"k={k} does not match qweight with {w} rows for bits={bits}")
    return _unpack_axis0(words, bits)[:k]


def pack_cols(values, bits: int) -> np.ndarray:
    """Pack values [G, N] along N (axis 1) into a GPTQ ``qzeros``.

    Returns int32 ``[G, N*bits/32]``; every row is a little-endian bit stream
    like a :func:`pack_rows` column.  Raises ValueError for unsupported
    ``bits``, out-of-range ``values`` or ``N*bits`` not a multiple of 32."""
    bits = _check_bits(bits)
    vals = _as_int_values(values, "values", bits)
    n = vals.shape[1]
    if (n * bits) % 32:
        raise ValueError(
            f"values has N={n} columns; N*bits must be a multiple of 32 (bits={bits})"
        )
    return np.ascontiguousarray(_pack_axis0(np.ascontiguousarray(vals.T), bits).T)


def unpack_cols(qzeros, bits: int, n: Optional[int] = None) -> np.ndarray:
    """Inverse of :func:`pack_cols`: ``qzeros`` [G, W] -> int32 values [G, N].

    ``n`` defaults to ``W*32/bits``; if given it must need exactly W words."""
    bits = _check_bits(bits)
    words = _as_words(qzeros, "qzeros")
    w = words.shape[1]
    if (w * 32) % bits:
        raise ValueError(
            f"qzeros has {w} columns, which do not hold a whole number of "
            f"{bits}-bit values (cols*32 must be a multiple of bits)"
        )
    capacity = w * 32 // bits
    if n is None:
        n = capacity
    n = _check_count(n, "n")
    if -(-n * bits // 32) != w:
        raise ValueError(f"n={n} does not match qzeros with {w} columns for bits={bits}")
    vals = _unpack_axis0(np.ascontiguousarray(words.T), bits)[:n]
    return np.ascontiguousarray(vals.T)


# ---------------------------------------------------------------------------
# dequantization / reference GEMM
# ---------------------------------------------------------------------------


def _resolve_g_idx(g_idx, k: int, groups: int) -> np.ndarray:
    """Validate ``g_idx`` (or build the default ``k // (K // G)``)."""
    if g_idx is None:
        if groups <= 0 or k % groups:
            raise ValueError(
                f"g_idx is None but K={k} is not a multiple of the number of "
                f"groups G={groups}"
            )
        return np.arange(k, dtype=np.int64) // (k // groups)
    gi = np.asarray(g_idx)
    if gi.ndim != 1 or gi.shape[0] != k:
        raise ValueError(f"g_idx must have shape ({k},), got {gi.shape}")
    if gi.dtype.kind not in "iu":
        raise ValueError(f"g_idx must be an integer array, got dtype {gi.dtype}")
    if gi.size and (gi.min() < 0 or gi.max() >= groups):
        raise ValueError(f"g_idx values must lie in [0, {groups}), got [{gi.min()}, {gi.max()}]")
    return gi.astype(np.int64)


def dequantize(qweight, qzeros, scales, g_idx, bits: int, v2: bool = False) -> np.ndarray:
    """Dequantize GPTQ tensors to a float64 weight ``[K, N]``.

    ``w[k, n] = scales[g, n] * (q[k, n] - z[g, n])``, ``g = g_idx[k]``, with
    ``z = stored + 1`` (v1) or ``z = stored`` (v2).  ``g_idx=None`` means
    ``k // (K // G)``.  All arithmetic is done in float64."""
    bits = _check_bits(bits)
    q = unpack_rows(qweight, bits)
    k, n = q.shape
    sc = np.asarray(scales)
    if sc.ndim != 2 or sc.shape[1] != n:
        raise ValueError(f"scales must have shape (G, {n}), got {sc.shape}")
    groups = sc.shape[0]
    z = unpack_cols(qzeros, bits, n=n).astype(np.int64)
    if z.shape[0] != groups:
        raise ValueError(f"qzeros has {z.shape[0]} rows but scales has {groups} groups")
    if not v2:
        z = z + 1
    g = _resolve_g_idx(g_idx, k, groups)
    return sc.astype(np.float64)[g] * (q.astype(np.float64) - z[g].astype(np.float64))


def reference_gemm(a, qweight, qzeros, scales, g_idx, bits: int, v2: bool = False) -> np.ndarray:
    """Reference ``a @ W`` in float64, with W = :func:`dequantize` (...).

    ``a`` is ``[M, K]`` (any float dtype); returns float64 ``[M, N]``."""
    w = dequantize(qweight, qzeros, scales, g_idx, bits, v2=v2)
    a = np.asarray(a)
    if a.ndim < 1 or a.shape[-1] != w.shape[0]:
        raise ValueError(f"a must have last dimension K={w.shape[0]}, got shape {a.shape}")
    return a.astype(np.float64) @ w


# ---------------------------------------------------------------------------
# container
# ---------------------------------------------------------------------------


@dataclass
class GPTQTensors:
    """One GPTQ-quantized linear weight, as stored in checkpoints.

    Shapes: qweight int32 ``[K*bits/32, N]``, qzeros int32 ``[G, N*bits/32]``,
    scales float16 ``[G, N]``, g_idx int32 ``[K]``.  ``group_size`` is the
    number of rows per group (-1: a single group of all K rows); ``v2``
    selects the zero-point convention (v1: z = stored + 1, v2: z = stored)."""

    qweight: np.ndarray
    qzeros: np.ndarray
    scales: np.ndarray
    g_idx: np.ndarray
    bits: int
    group_size: int
    v2: bool = False

    @property
    def k(self) -> int:
        """Number of input rows K."""
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def n(self) -> int:
        """Number of output columns N."""
        return self.qweight.shape[1]

    @property
    def num_groups(self) -> int:
        """Number of groups G."""
        return self.scales.shape[0]

    def dequantize(self) -> np.ndarray:
        """The float64 weight ``[K, N]`` these tensors represent."""
        return dequantize(self.qweight, self.qzeros, self.scales, self.g_idx,
                          self.bits, v2=self.v2)


# ---------------------------------------------------------------------------
# quantization / random tensors
# ---------------------------------------------------------------------------


def _as_rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _make_g_idx(k: int, group_size, act_order: bool, rng: np.random.Generator):
    """Return (g_idx int32 [K], rows per group, G) for a layout.

    Without act_order row k is in group ``k // group_size``.  With act_order a
    random permutation ``perm`` of the rows is drawn and the rows visited in
    that order fill group 0 first, then group 1, ...:
    ``g_idx[perm[i]] = i // group_size``."""
    if isinstance(group_size, (bool, np.bool_)) or not isinstance(group_size, numbers.Integral):
        raise ValueError(f"group_size must be an integer, got {group_size!r}")
    group_size = int(group_size)
    if group_size == -1:
        gs = k
    elif group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    elif k % group_size:
        raise ValueError(f"group_size={group_size} must divide K={k}")
    else:
        gs = group_size
    groups = k // gs if gs else 0
    g_idx = np.empty(k, dtype=np.int32)
    if act_order:
        perm = rng.permutation(k)
        g_idx[perm] = (np.arange(k) // gs).astype(np.int32)
    else:
        g_idx[:] = np.arange(k) // max(gs, 1)
    return g_idx, gs, groups


def _check_shape_kn(k: int, n: int, bits: int, name: str) -> None:
    if k <= 0 or n <= 0:
        raise ValueError(f"{name} must have positive K and N, got K={k}, N={n}")
    if (k * bits) % 32:
        raise ValueError(f"{name}: K={k} must make K*bits a multiple of 32 (bits={bits})")
    if (n * bits) % 32:
        raise ValueError(f"{name}: N={n} must make N*bits a multiple of 32 (bits={bits})")


def _fp16_scale_up(scale: np.ndarray) -> np.ndarray:
    """Round float64 scales to float16, upward, so a group's range still fits
    in ``2**bits - 1`` steps after rounding (this keeps |error| <= scale/2)."""
    if np.any(scale > _MAX_SCALE):
        raise ValueError("weight: a group's range is too large for float16 scales")
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float64) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    if np.any(np.isinf(s16)):
        raise ValueError("weight: a group's range is too large for float16 scales")
    return s16


def quantize(weight, bits: int, group_size: int = 128, act_order: bool = False,
             v2: bool = False, rng=None) -> GPTQTensors:
    """Quantize a float weight ``[K, N]`` into GPTQ tensors (min/max RTN).

    Asymmetric per-group, per-column quantization.  The range of each group
    and column is extended to include 0 (as GPTQ's own quantizer does), so
    the zero point is always representable and every element dequantizes
    within ``scale/2`` of its input:

    * ``scale = max((max - min) / (2**bits - 1), 2**-24)``, rounded *up* to
      float16; the floor (the smallest positive float16) only matters for
      all-zero groups and keeps ``w / scale`` finite;
    * ``z = round(-min / scale)`` (in ``[0, 2**bits - 1]``); in v1 the stored
      zero is ``z - 1``, so z must be >= 1: if z would be 0 (a group with no
      significantly negative value) the scale is recomputed as
      ``max / (2**bits - 2)`` and z = 1, which still covers the range;
    * ``q = clip(round(w / scale) + z, 0, 2**bits - 1)`` using the float16
      scale, so :meth:`GPTQTensors.dequantize` is consistent with q.

    ``group_size=-1`` uses one group of all K rows; otherwise it must divide
    K.  With ``act_order`` rows are assigned to groups by a random permutation
    (see :func:`random_gptq`); ``rng`` is a Generator or a seed."""
    bits = _check_bits(bits)
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"weight must be a 2-D array, got shape {w.shape}")
    if w.dtype.kind not in "fiu":
        raise ValueError(f"weight must be a real numeric array, got dtype {w.dtype}")
    w = w.astype(np.float64)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight must be finite")
    k, n = w.shape
    _check_shape_kn(k, n, bits, "weight")
    g_idx, gs, groups = _make_g_idx(k, group_size, act_order, _as_rng(rng))
    qmax = (1 << bits) - 1

    # Per-group statistics: gather each group's rows together.
    order = np.argsort(g_idx, kind="stable")
    wg = w[order].reshape(groups, gs, n)
    lo = np.minimum(wg.min(axis=1), 0.0)  # [G, N]
    hi = np.maximum(wg.max(axis=1), 0.0)

    scale = _fp16_scale_up(np.maximum((hi - lo) / qmax, _MIN_SCALE))
    z = np.clip(np.round(-lo / scale.astype(np.float64)), 0, qmax)
    if not v2:
        fix = z < 1
        if np.any(fix):
            alt = _fp16_scale_up(np.maximum(hi[fix] / (qmax - 1), _MIN_SCALE))
            scale[fix] = alt
            z[fix] = 1
    z = z.astype(np.int64)

    s_rows = scale.astype(np.float64)[g_idx]
    q = np.clip(np.round(w / s_rows) + z[g_idx], 0, qmax).astype(np.int64)
    stored = z - 1 if not v2 else z
    return GPTQTensors(
        qweight=pack_rows(q, bits),
        qzeros=pack_cols(stored, bits),
        scales=scale,
        g_idx=g_idx,
        bits=bits,
        group_size=int(group_size),
        v2=bool(v2),
    )


def random_gptq(k: int, n: int, bits: int, group_size: int = 128, act_order: bool = False,
                v2: bool = False, rng=None) -> GPTQTensors:
    """Random GPTQ tensors for tests, exercising the whole value range.

    q and the stored zeros are uniform over ``[0, 2**bits)`` (so the extreme
    v1 stored zero ``2**bits - 1``, meaning z = 2**bits, occurs); scales are
    positive float16 uniform in ``[0.002, 0.02]`` (GPTQ scales are always
    positive, and this magnitude keeps GEMM outputs in a sane fp16 range);
    g_idx follows :func:`quantize` for ``group_size`` / ``act_order``."""
    bits = _check_bits(bits)
    k = _check_count(k, "k")
    n = _check_count(n, "n")
    _check_shape_kn(k, n, bits, "random_gptq")
    gen = _as_rng(rng)
    g_idx, _, groups = _make_g_idx(k, group_size, act_order, gen)
    q = gen.integers(0, 1 << bits, size=(k, n))
    zeros = gen.integers(0, 1 << bits, size=(groups, n))
    scales = gen.uniform(0.002, 0.02, size=(groups, n)).astype(np.float16)
    return GPTQTensors(
        qweight=pack_rows(q, bits),
        qzeros=pack_cols(zeros, bits),
        scales=scales,
        g_idx=g_idx,
        bits=bits,
        group_size=int(group_size),
        v2=bool(v2),
    )


# ---------------------------------------------------------------------------
# row permutation (reference for a "shuffle" op)
# ---------------------------------------------------------------------------


def permute_rows(qweight, perm, bits: int) -> np.ndarray:
    """Repack ``qweight`` so that its unpacked row i is old row ``perm[i]``.

    This is the reference for kernels that reorder act-order weights.
    ``perm`` must be a permutation of ``range(K)``."""
    bits = _check_bits(bits)
    q = unpack_rows(qweight, bits)
    k = q.shape[0]
    p = np.asarray(perm)
    if p.ndim != 1 or p.shape[0] != k:
        raise ValueError(f"perm must have shape ({k},), got {p.shape}")
    if p.dtype.kind not in "iu":
        raise ValueError(f"perm must be an integer array, got dtype {p.dtype}")
    if not np.array_equal(np.sort(p), np.arange(k)):
        raise ValueError(f"perm must be a permutation of range({k})")
    return pack_rows(q[p], bits)


# ---------------------------------------------------------------------------
# the shuffled layout (reference for gptq_shuffle)
# ---------------------------------------------------------------------------

#: 4-bit weights after ``gptq_shuffle``: within every 32-row pack of a column,
#: stream position ``8*t + j`` (word row t of the pack, nibble j, bits
#: ``4j..4j+3``) holds row ``16*(j % 2) + 8*((j // 2) % 2) + 2*t + j // 4`` of
#: the pack. Each nibble pair (j, j+4), which one AND/OR turns into a half2,
#: holds two adjacent rows: word row t holds rows (2t, 2t+1) in nibbles (0, 4),
#: (2t+8, 2t+9) in (2, 6), (2t+16, 2t+17) in (1, 5) and (2t+24, 2t+25) in
#: (3, 7). Those are exactly lane t's k pairs of a tensor-core A fragment
#: (mma.sync m16n8k16, wgmma m64nNk16) for the pack's two k16 steps, the first
#: step in the even nibbles (masked in place) and the second in the odd ones
#: (masked in place as 16 q). Words stay where GPTQ puts them (``[K/8, N]``,
#: word row ``4*pack + t``).
TENSOR_CORE_PACK_ORDER = tuple(16 * (j % 2) + 8 * ((j // 2) % 2) + 2 * t + j // 4 for t in range(4) for j in range(8))


def _pack_order(bits: int) -> np.ndarray:
    """Row of the pack held at each stream position after gptq_shuffle."""
    if bits == 4:
        return np.asarray(TENSOR_CORE_PACK_ORDER)
    return np.arange(32)


def shuffle(qweight, perm, bits: int) -> np.ndarray:
    """The reference of ``gptq_shuffle``: rows reordered by ``perm`` (row r
    takes old row ``perm[r]``; ``None`` keeps the order), then, for 4-bit
    weights, every 32-row pack re-laid in :data:`TENSOR_CORE_PACK_ORDER`.
    Returns a new int32 ``[K*bits/32, N]`` array; 2/3/8-bit weights only move
    rows."""
    bits = _check_bits(bits)
    q = unpack_rows(qweight, bits)
    if perm is not None:
        q = unpack_rows(permute_rows(qweight, perm, bits), bits)
    if q.shape[0] % 32:
        raise ValueError(f"qweight has K={q.shape[0]} rows; K must be a multiple of 32")
    blocks = q.reshape(q.shape[0] // 32, 32, -1)
    return pack_rows(blocks[:, _pack_order(bits)].reshape(q.shape), bits)


def unshuffle(qweight, perm, bits: int) -> np.ndarray:
    """Inverse of :func:`shuffle`: the checkpoint's ``qweight`` back."""
    bits = _check_bits(bits)
    q = unpack_rows(qweight, bits)
    if q.shape[0] % 32:
        raise ValueError(f"qweight has K={q.shape[0]} rows; K must be a multiple of 32")
    blocks = q.reshape(q.shape[0] // 32, 32, -1)
    ordered = np.empty_like(blocks)
    ordered[:, _pack_order(bits)] = blocks
    q = ordered.reshape(q.shape)
    if perm is not None:
        restored = np.empty_like(q)
        restored[np.asarray(perm)] = q
        q = restored
    return pack_rows(q, bits)
