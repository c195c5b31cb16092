"""gptq_gemm and gptq_shuffle with vLLM's signatures, for any DLPack producer."""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

from . import _C
from ._frameworks import capsule, copy_of, empty_like, is_absent, is_gpu, launch_for, library_of, shape_of

_SUPPORTED_BITS = (2, 3, 4, 8)
_last = threading.local()


def last_kernel() -> Optional[str]:
    """Which kernel served this thread's last gptq_gemm: "cpu", "wgmma", "mma", "skinny",
    "tiled", "exllama/<variant>" or "dense" (dequantize + torch.matmul) (diagnostics and tests)."""
    return getattr(_last, "kernel", None)


def _check_bit(bit: int) -> int:
    if isinstance(bit, bool) or not isinstance(bit, int) or bit not in _SUPPORTED_BITS:
        raise ValueError(f"bit must be one of 2, 3, 4, 8; got {bit!r}")
    return bit


def _check_2d(x: Any, name: str, what: str) -> tuple:
    shape = shape_of(x, name)
    if len(shape) != 2:
        raise ValueError(f"{name} must be 2-D {what}; got shape {list(shape)}")
    return shape


class _DeviceIndexCheck:
    """Validates torch GPU index tensors once per tensor version.

    CPU arrays are checked by the engine on every call. A GPU array can only be
    read with a device sync, which a decode step (and a CUDA graph capture)
    must not pay, so its check runs on first sight of each (pointer, version)
    and is skipped while a graph is being captured. vLLM warms every layer up
    before capture, so every index tensor it uses is checked. What escapes the
    check still cannot read out of bounds: the kernels turn a bad index into NaN.
    """

    def __init__(self, capacity: int = 8192):
        self._seen: set = set()
        self._capacity = capacity

    def __call__(self, x: Any, name: str, kind: str, bound: int) -> None:
        if library_of(x) != "torch" or x.device.type == "cpu":
            return
        import torch

        if torch.cuda.is_current_stream_capturing():
            return
        key = (kind, x.data_ptr(), x._version, x.numel(), bound)
        if key in self._seen:
            return
        if x.dtype != torch.int32:
            return  # the engine reports the dtype, naming the argument
        if kind == "permutation":
            expected = torch.arange(x.numel(), device=x.device, dtype=x.dtype)
            if not torch.equal(torch.sort(x).values, expected):
                raise ValueError(f"{name} must be a permutation of 0..{x.numel()} (argsort of g_idx)")
        elif x.numel() and (int(x.min()) < 0 or int(x.max()) >= bound):
            raise ValueError(f"{name} has entries outside 0..{bound - 1}: there are {bound} groups (rows of b_gptq_scales)")
        if len(self._seen) >= self._capacity:
            self._seen.clear()
        self._seen.add(key)


_check_device_indices = _DeviceIndexCheck()


def gptq_gemm(
    a: Any,
    b_q_weight: Any,
    b_gptq_qzeros: Any,
    b_gptq_scales: Any,
    b_g_idx: Any,
    use_exllama: bool,
    bit: int,
    use_v2_format: bool = False,
    *,
    out: Any = None,
    path: Optional[str] = None,
    variant: Optional[str] = None,
) -> Any:
    """``a @ dequantize(b)`` for GPTQ-packed weights, as vLLM's ``ops.gptq_gemm``.

    a: float16 ``[M, K]``. b_q_weight: int32 ``[K*bit/32, N]``. b_gptq_qzeros:
    int32 ``[groups, N*bit/32]``. b_gptq_scales: float16 ``[groups, N]``.

    b_g_idx: with ``use_exllama=True`` the act-order permutation that
    :func:`gptq_shuffle` applied to ``b_q_weight`` (vLLM passes
    ``argsort(g_idx)``), and the activations' K axis is read through it; with
    ``use_exllama=False`` the group of every input row of unshuffled weights.
    ``None``, an empty array or a torch meta tensor mean "none".

    use_v2_format: zero points are stored as-is (v2) instead of minus one (v1).
    out: optional float16 ``[M, N]`` to write into (fully overwritten).
    path: force a kernel ("skinny", "tiled", "exllama", "mma", or "dense" = dequantize +
    torch.matmul, torch GPU tensors only); None lets the dispatch table choose.
    variant: the Opt4GPTQ variant of the exllama kernels (see :func:`opt4gptq.variants`);
    None reads ``OPT4GPTQ_VARIANT``, then falls back to the platform default.
    Every variant gives the same bits on identical calls; on a GPU the split-K
    ones (baseline, vml, ila) also allocate a float16 ``[ceil(K / 128), M, N]``
    workspace for their K blocks' shares, like ``out``.

    Returns ``[M, N]`` float16 from the caller's library, on its device; GPU
    work is queued on the caller's current stream without synchronizing.
    """
    _check_bit(bit)
    m, k = _check_2d(a, "a", "[M, K] activations")
    _, n = _check_2d(b_q_weight, "b_q_weight", "[K * bit / 32, N] packed weights")
    groups, _ = _check_2d(b_gptq_scales, "b_gptq_scales", "[groups, N] scales")
    g_idx = None if is_absent(b_g_idx) else b_g_idx
    if g_idx is not None:
        if use_exllama:
            _check_device_indices(g_idx, "b_g_idx (use_exllama=True: the act-order permutation)", "permutation", 0)
        else:
            _check_device_indices(g_idx, "b_g_idx", "groups", groups)
    if out is None:
        out = empty_like(a, (m, n), "float16")
    launch = launch_for(a)
    if variant is None:
        variant = os.environ.get("OPT4GPTQ_VARIANT") or None
    if g_idx is not None and use_exllama and _gathers_on_torch(a, bit, path, variant):
        a, g_idx = _permuted_activations(a, g_idx), None
    if _wants_dense(a, m, n, k, bit, use_exllama, path, variant is not None):
        _dense_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, g_idx, out, use_exllama, bit, use_v2_format, launch)
        return out
    workspace = None
    workspace_shape = _C.split_k_workspace(m, k, n, bit, bool(use_exllama), path, variant) if is_gpu(a) else None
    if workspace_shape is not None:
        # The split-K variants store each K block's shares in its own [M, N]
        # slice, then add the slices in order. Like out, the workspace comes
        # from the caller's library: stream-ordered and graph-capturable, and
        # one per call, so concurrent streams never share one.
        workspace = empty_like(a, workspace_shape, "float16")
    _last.kernel = _C.gemm(
        capsule(a, launch),
        capsule(b_q_weight, launch),
        capsule(b_gptq_qzeros, launch),
        capsule(b_gptq_scales, launch),
        None if g_idx is None else capsule(g_idx, launch),
        capsule(out, launch),
        bool(use_exllama),
        bit,
        bool(use_v2_format),
        path,
        variant,
        launch.stream,
        None if workspace is None else capsule(workspace, launch),
    )
    if launch.synchronize_after:
        _C.stream_synchronize(a.__dlpack_device__()[1], launch.stream)
    return out


def _gathers_on_torch(a: Any, bit: int, path: Optional[str], variant: Optional[str]) -> bool:
    """Act-order on a torch GPU for the tensor-core paths: gather the activations
    once with torch (one small kernel) instead of per element inside ours, which
    then streams them with asynchronous copies (the wgmma kernels' copy engine
    reads only contiguous rows)."""
    return (bit == 4 and variant is None and path in (None, "mma", "wgmma") and library_of(a) == "torch"
            and a.device.type == "cuda" and _C.backend() == "cuda")


def _permuted_activations(a: Any, perm: Any) -> Any:
    import torch

    return torch.index_select(a, 1, perm)


def _wants_dense(a: Any, m: int, n: int, k: int, bit: int, use_exllama: bool, path: Optional[str],
                 variant_named: bool) -> bool:
    """Many rows on a torch GPU: dequantize once, then the vendor GEMM (as vLLM
    does), except where our Hopper kernels serve every row count."""
    if path is not None:
        if path != "dense":
            return False
        if library_of(a) != "torch" or a.device.type != "cuda":
            raise ValueError("path='dense' needs torch GPU tensors (it runs torch.matmul)")
        return True
    if library_of(a) != "torch" or a.device.type != "cuda":
        return False
    device = a.device.index if _C.backend() == "cuda" else None
    return m >= _C.dense_min_rows(bit, bool(use_exllama), variant_named, device, n, k)


def _dense_gemm(a, qweight, qzeros, scales, g_idx, out, use_exllama, bit, use_v2_format, launch) -> None:
    import torch

    m, k = shape_of(a, "a")
    n = shape_of(qweight, "b_q_weight")[1]
    if tuple(out.shape) != (m, n) or out.dtype != torch.float16 or out.device != a.device:
        raise ValueError(f"out must be float16 [M, N] = [{m}, {n}] on {a.device}; "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    # The workspace comes from torch's allocator (graph-safe, pooled), never from us.
    weights = torch.empty((k, n), dtype=torch.float16, device=a.device)
    _C.dequantize(capsule(a, launch), capsule(qweight, launch), capsule(qzeros, launch), capsule(scales, launch),
                  None if g_idx is None else capsule(g_idx, launch), capsule(weights, launch),
                  bool(use_exllama), bit, bool(use_v2_format), launch.stream)
    torch.matmul(a, weights, out=out)
    _last.kernel = "dense"


def gptq_shuffle(q_weight: Any, q_perm: Any, bit: int) -> None:
    """Re-lay ``q_weight`` in place for :func:`gptq_gemm` with ``use_exllama=True``.

    Our shuffled layout is the GPTQ packing with rows reordered (afterwards row
    r holds what row ``q_perm[r]`` held) and, for 4-bit weights, every 32-row
    pack re-laid in the tensor-core pack order (README, "Weight layout";
    numpy reference: ``opt4gptq.pack.shuffle``). Without a permutation
    (``None``, empty, or vLLM 0.3.3's meta tensor) rows stay in place: 2/3/8-bit
    weights are left alone, 4-bit ones still get the pack order. As with vLLM's
    own op, weights passed to ``gptq_gemm(use_exllama=True)`` must have been
    shuffled once, and only once. Load-time only: on GPU it allocates one
    scratch copy of ``q_weight`` through the caller's library.
    """
    _check_bit(bit)
    rows, _ = _check_2d(q_weight, "q_weight", "[K * bit / 32, N] packed weights")
    if is_absent(q_perm):
        if bit != 4:
            return
        q_perm = None
    else:
        _check_device_indices(q_perm, "q_perm", "permutation", 0)
    launch = launch_for(q_weight)
    source = copy_of(q_weight)
    perm = None if q_perm is None else capsule(q_perm, launch)
    _C.permute_rows(capsule(source, launch), capsule(q_weight, launch), perm, bit, launch.stream)
    if launch.synchronize_after:
        _C.stream_synchronize(q_weight.__dlpack_device__()[1], launch.stream)
