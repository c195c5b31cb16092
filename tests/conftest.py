"""Shared test machinery: random GPTQ problems, array libraries, the reference check.

Every kernel result is compared with pack.reference_gemm (float64 dequantize,
then matmul) on fresh random data, with the output poisoned (NaN) first.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

import opt4gptq
from opt4gptq import pack

ROOT = Path(__file__).resolve().parents[1]

# fp16 output: rounding alone contributes up to 2**-11 ~ 4.9e-4 relative per
# element; fp32 accumulation over K <= 14k adds orders of magnitude less. A
# norm-wise bound of 1e-3 leaves 2x headroom and still catches one wrong
# group, a wrong zero offset (~1/8 of a scale step per weight) or a dropped K block.
REL_TOL = 1e-3


def fresh_seed() -> int:
    """A new seed per call (override with OPT4GPTQ_TEST_SEED to replay a failure)."""
    fixed = os.environ.get("OPT4GPTQ_TEST_SEED")
    return int(fixed) if fixed else secrets.randbelow(2**31)


@dataclass
class Problem:
    """One random gptq_gemm problem in numpy, plus what the op must return."""

    a: np.ndarray
    t: pack.GPTQTensors
    use_exllama: bool
    seed: int
    kernel: Optional[str] = None  # which kernel served the last run_op (opt4gptq.last_kernel())

    # Cached: problems are shared between variants; treat a and t as immutable.
    @functools.cached_property
    def weights(self) -> np.ndarray:
        return self.t.dequantize()

    @functools.cached_property
    def reference(self) -> np.ndarray:
        return self.a.astype(np.float64) @ self.weights

    @functools.cached_property
    def abs_sum(self) -> np.ndarray:
        """|a| @ |W|: the scale of every rounding error in the dot products."""
        return np.abs(self.a.astype(np.float64)) @ np.abs(self.weights)

    @property
    def perm(self) -> Optional[np.ndarray]:
        """What vLLM hands gptq_shuffle/gptq_gemm with exllama: argsort(g_idx) for act-order."""
        if not (self.use_exllama and self.act_order):
            return None
        return np.argsort(self.t.g_idx, kind="stable").astype(np.int32)

    @property
    def act_order(self) -> bool:
        return bool(np.any(np.diff(self.t.g_idx) < 0))

    def describe(self) -> str:
        t = self.t
        return (f"M={self.a.shape[0]} K={t.k} N={t.n} bits={t.bits} group={t.group_size} "
                f"act_order={self.act_order} exllama={self.use_exllama} v2={t.v2} seed={self.seed}")


def make_problem(m: int, k: int, n: int, bits: int, group_size: int, act_order: bool,
                 use_exllama: bool, v2: bool = False, seed: Optional[int] = None) -> Problem:
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    t = pack.random_gptq(k, n, bits, group_size, act_order=act_order, v2=v2, rng=rng)
    a = rng.standard_normal((m, k)).astype(np.float16)
    return Problem(a=a, t=t, use_exllama=use_exllama, seed=seed)


@dataclass
class Library:
    """How to move numpy data into one array library/device and back."""

    name: str
    to: Callable[[np.ndarray], Any]
    back: Callable[[Any], np.ndarray]
    synchronize: Callable[[], None] = lambda: None


def numpy_library() -> Library:
    return Library("numpy", lambda x: x.copy(), lambda x: np.asarray(x))


def torch_library(device: str = "cpu") -> Library:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return Library(f"torch-{device}", lambda x: torch.from_numpy(x.copy()).to(device),
                   lambda x: x.cpu().numpy(), sync)


def run_op(problem: Problem, lib: Library, path: Optional[str] = None, out_buffer: Any = None) -> np.ndarray:
    """The vLLM sequence: shuffle once (exllama), then gemm into a NaN-poisoned output."""
    t = problem.t
    qweight = lib.to(t.qweight)
    perm = problem.perm
    if problem.use_exllama:
        opt4gptq.gptq_shuffle(qweight, None if perm is None else lib.to(perm), t.bits)
        index = None if perm is None else lib.to(perm)
    else:
        index = lib.to(t.g_idx)
    m, n = problem.a.shape[0], t.n
    out = lib.to(np.full((m, n), np.nan, dtype=np.float16)) if out_buffer is None else out_buffer
    result = opt4gptq.gptq_gemm(lib.to(problem.a), qweight, lib.to(t.qzeros), lib.to(t.scales), index,
                                problem.use_exllama, t.bits, t.v2, out=out, path=path)
    assert result is out, "gptq_gemm must return the out= array it wrote"
    problem.kernel = opt4gptq.last_kernel()
    lib.synchronize()
    return lib.back(result)


def fp32_gamma(k: int) -> float:
    """Worst-case relative error of an fp32 dot product of length k, per unit of sum|a*w|."""
    return k * 2.0**-24


U = 2.0**-11  # fp16 unit roundoff
# The exllama family forms (q - z) * a over 8 rows with fp16 FMAs before the
# fp32 accumulation, as vLLM's kernel does: a second fp16 rounding of each
# 8-row partial on top of the output's. Norm-wise that at most doubles the
# error of the fp32 kernels, hence twice their bound.
HALF_REL_TOL = 2 * REL_TOL
SPLIT_K_VARIANTS = ("baseline", "vml", "ila")  # K split over blocks, as in vLLM 0.3.3


def exllama_gamma(variant: str, k: int) -> float:
    """Per-element bound of the exllama family, per unit of sum|a*w| (to first
    order, fp16 underflow aside). Each 8-row partial takes 3 fp16 roundings (two
    FMAs and the joining add): 3u. Split-K variants also round each 128-row
    block's share to fp16, as vLLM does: u per unit of that block's own sum|a*w|,
    so u in all. The shares then add in fp32 in block order (at most k/128 adds,
    inside fp32_gamma(k); vLLM's fp16 atomics cost up to u more per block) and
    the total is rounded once."""
    gamma = 3 * U + fp32_gamma(k)
    if variant in SPLIT_K_VARIANTS:
        gamma += U
    return gamma


def mma_gamma(k: int) -> float:
    """The tensor-core paths sum fp16 products in the MMA's fp32 accumulators,
    whose internal alignment truncates rather than rounds: up to one fp32 ulp
    (2u32) per add, twice the IEEE fp32 bound. The mma K-slice kernel multiplies
    the exact integers (q - z) and applies the scale once per group in fp32; the
    mma tiled and the wgmma kernels round each weight (q - z) * s to fp16 first
    (u, as every GPTQ kernel's dequantization does), then add at most 16 fp32
    partial tiles (K-warps times cluster blocks; within the fp32 term, k >= 32)."""
    return U + 2 * fp32_gamma(k) + 2.0**-23


def assert_matches_reference(out: np.ndarray, problem: Problem, rel_tol: Optional[float] = None,
                             gamma: Optional[float] = None) -> None:
    """Norm-wise relative error below rel_tol, and every element inside the
    classic forward bound |got - ref| <= u*|ref| + gamma * (|a| @ |W|): one fp16
    rounding of the result (u = 2**-11) plus the accumulation's rounding, gamma
    per unit of the absolute sum. Defaults follow the kernel that ran: fp32
    accumulation, or the exllama family's fp16 partials."""
    kernel = problem.kernel or ""
    if kernel == "dense":
        # Weights rounded once to fp16, then torch.matmul, which by default lets
        # cuBLAS reduce fp16 products in reduced precision: the exllama bounds.
        rel_tol = HALF_REL_TOL if rel_tol is None else rel_tol
        gamma = 3 * U + fp32_gamma(problem.t.k) if gamma is None else gamma
    elif kernel.startswith("exllama/"):
        rel_tol = HALF_REL_TOL if rel_tol is None else rel_tol
        gamma = exllama_gamma(kernel.split("/", 1)[1], problem.t.k) if gamma is None else gamma
    elif kernel in ("mma", "wgmma"):
        gamma = mma_gamma(problem.t.k) if gamma is None else gamma
    rel_tol = REL_TOL if rel_tol is None else rel_tol
    ref = problem.reference
    assert out.shape == ref.shape, problem.describe()
    assert out.dtype == np.float16, problem.describe()
    assert not np.isnan(out).any(), f"output left unwritten (NaN poison survives): {problem.describe()}"
    if ref.size == 0:
        return
    got = out.astype(np.float64)
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel < rel_tol, f"relative error {rel:.2e} >= {rel_tol:.0e}: {problem.describe()}"
    gamma = fp32_gamma(problem.t.k) if gamma is None else gamma
    excess = np.max(np.abs(got - ref) - (U * np.abs(ref) + gamma * problem.abs_sum + 1e-7))
    assert excess <= 0, f"an element is off by {excess:.3e} beyond its bound: {problem.describe()}"


def capture_in_graph(call: Callable[[], Any], out: Any) -> Any:
    """Warm `call` up on a side stream, NaN-poison `out`, capture `call` in a CUDA graph.

    Returns the graph, not yet replayed: what a replay writes into `out` is the
    graph's work alone."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # first-use work (index validation) stays out of the graph
    torch.cuda.current_stream().wait_stream(side)
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def gpu_skip_reason() -> Optional[str]:
    if opt4gptq.backend() == "cpu":
        return "opt4gptq was built without a GPU backend (OPT4GPTQ_GPU unset or cpu)"
    try:
        import torch
    except ImportError:
        return "torch is not installed (the GPU tests drive the kernels through torch and CuPy)"
    if not torch.cuda.is_available() or not opt4gptq.devices():
        return f"no GPU visible to this {opt4gptq.backend()} build"
    return None


def vllm_source_or_skip(harness: Any) -> Any:
    """A vLLM harness's downloaded Python source, or a skip that says why not."""
    try:
        return harness.fetch_source()
    except Exception as error:  # no network, no pip: say so
        pytest.skip(f"cannot fetch vLLM {harness.VLLM_VERSION}'s source from PyPI: {error}")


def exllama_tensors_on_cuda(problem: Problem) -> tuple:
    """(a, qweight, qzeros, scales, perm) as CUDA tensors, qweight shuffled the way
    vLLM does before its first exllama call; perm is None without act-order."""
    import torch

    t = problem.t
    perm = None if problem.perm is None else torch.from_numpy(problem.perm).cuda()
    qweight = torch.from_numpy(t.qweight.copy()).cuda()
    opt4gptq.gptq_shuffle(qweight, perm, t.bits)
    a, zeros, scales = (torch.from_numpy(x).cuda() for x in (problem.a, t.qzeros, t.scales))
    return a, qweight, zeros, scales, perm


def nan_like_output(problem: Problem) -> Any:
    """A NaN-poisoned CUDA float16 [M, N] buffer: anything left unwritten shows."""
    import torch

    return torch.full((problem.a.shape[0], problem.t.n), float("nan"), dtype=torch.float16, device="cuda")


def find_tool(*names: str) -> Optional[str]:
    """The first of `names` on PATH or in .toolchain/ (where .ci/run installs NVIDIA's tools)."""
    toolchain = sorted(str(p) for p in (ROOT / ".toolchain").glob("*/nvidia/cu*/bin"))
    search = os.pathsep.join(toolchain + [os.environ.get("PATH", "")])
    for name in names:
        found = shutil.which(name, path=search)
        if found:
            return found
    return None
