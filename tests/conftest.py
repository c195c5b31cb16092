"""Shared test machinery: random GPTQ problems, array libraries, the reference check.

Every kernel result is compared with pack.reference_gemm (float64 dequantize,
then matmul) on fresh random data, with the output poisoned (NaN) first.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest

import opt4gptq
from opt4gptq import pack

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

    @property
    def reference(self) -> np.ndarray:
        t = self.t
        return pack.reference_gemm(self.a, t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.v2)

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
    lib.synchronize()
    return lib.back(result)


def assert_matches_reference(out: np.ndarray, problem: Problem, rel_tol: float = REL_TOL) -> None:
    ref = problem.reference
    assert out.shape == ref.shape, problem.describe()
    assert out.dtype == np.float16, problem.describe()
    assert not np.isnan(out).any(), f"output left unwritten (NaN poison survives): {problem.describe()}"
    if ref.size == 0:
        return
    got = out.astype(np.float64)
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel < rel_tol, f"relative error {rel:.2e} >= {rel_tol:.0e}: {problem.describe()}"
    # Per element: fp16 rounding of the element plus accumulation noise at the scale of the output.
    scale = np.sqrt(np.mean(ref**2))
    worst = np.max(np.abs(got - ref) - (2**-10 * np.abs(ref) + 1e-3 * scale))
    assert worst <= 0, f"an element is off by {worst:.3e} beyond its bound: {problem.describe()}"


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
