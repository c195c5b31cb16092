"""Probe of the Hopper wgmma kernels (gemm_wgmma.cuh) on the device: where an
error sits (per output column, per k16 step, per token, per K split) and how
each block shape and K split times on a few layers. Development tool: the
spec lives in tests/test_wgmma.py, the numbers in bench_gemm.py.

    python benchmarks/probes/wgmma_probe.py anatomy
    python benchmarks/probes/wgmma_probe.py sweep
    python benchmarks/probes/wgmma_probe.py once K N M      # one call, for ncu
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import opt4gptq
from opt4gptq import pack


def problem(k, n, m, seed, group=128):
    rng = np.random.default_rng(seed)
    t = pack.random_gptq(k, n, 4, group, rng=rng)
    a = rng.standard_normal((m, k)).astype(np.float16)
    q = torch.from_numpy(t.qweight).cuda()
    opt4gptq.gptq_shuffle(q, None, 4)
    dev = [q] + [torch.from_numpy(x).cuda() for x in (t.qzeros, t.scales)]
    w = t.dequantize()
    return t, a, dev, w


def run(a, dev, tuning=None):
    if tuning:
        os.environ["OPT4GPTQ_WGMMA_TUNING"] = tuning
    else:
        os.environ.pop("OPT4GPTQ_WGMMA_TUNING", None)
    a_t = torch.from_numpy(a).cuda()
    out = torch.full((a.shape[0], dev[0].shape[1]), float("nan"), dtype=torch.float16, device="cuda")
    opt4gptq.gptq_gemm(a_t, *dev, None, True, 4, out=out, path="wgmma")
    torch.cuda.synchronize()
    return out.cpu().numpy().astype(np.float64), opt4gptq.last_kernel()


def rel(got, ref):
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def anatomy():
    t, a, dev, w = problem(128, 128, 8, 1)
    got, kernel = run(a, dev)
    ref = a.astype(np.float64) @ w
    print(f"K=128 N=128 M=8 ({kernel}): rel {rel(got, ref):.2e}  nan {np.isnan(got).sum()}")
    col_err = np.linalg.norm(got - ref, axis=0) / np.maximum(np.linalg.norm(ref, axis=0), 1e-30)
    bad = np.nonzero(col_err > 1e-2)[0]
    print(f"  bad columns ({len(bad)}): {bad.tolist()[:64]}")
    row_err = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    print("  per token:", " ".join(f"{e:.1e}" for e in row_err))
    for step in range(8):
        masked = np.zeros_like(a)
        masked[:, 16 * step:16 * step + 16] = a[:, 16 * step:16 * step + 16]
        g, _ = run(masked, dev)
        r = masked.astype(np.float64) @ w
        print(f"  k16 step {step}: rel {rel(g, r):.2e}")
    for k in range(0, 32, 1):
        masked = np.zeros_like(a)
        masked[:, k] = a[:, k]
        g, _ = run(masked, dev)
        r = masked.astype(np.float64) @ w
        e = rel(g, r)
        if e > 1e-2:
            # which k did the kernel use instead? correlate with each row of w
            best = int(np.argmax([abs(np.corrcoef(g[0], a[0, k] * w[j])[0, 1]) for j in range(32)]))
            print(f"  k={k}: rel {e:.2e}, output looks like row {best}")
    for k, n, m in ((2048, 512, 1), (2048, 512, 8), (4096, 4096, 1), (4096, 4096, 64), (4096, 4096, 200)):
        t, a, dev, w = problem(k, n, m, 2)
        ref = a.astype(np.float64) @ w
        line = []
        for splits in (1, 2, 4, 8):
            got, kernel = run(a, dev, f"splits={splits}")
            line.append(f"splits {splits}: {rel(got, ref):.2e}")
        got, kernel = run(a, dev)
        print(f"K={k} N={n} M={m} default {rel(got, ref):.2e} | " + "  ".join(line))


def median_us(fn, reps=30):
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return float(np.median(times))


SWEEP_SPLITS = (1, 2, 3, 4, 6, 8)


def sweep(ms=(16, 32, 64, 128, 256, 1024)):
    """Per layer: the plan, every K split, the mma.sync kernel (up to 64 rows)
    and cuBLAS on the dense fp16 weights, microseconds per call."""
    for k, n in ((4096, 4096), (4096, 22016), (11008, 4096)):
        sets = []
        for s in range(4):  # rotate past the L2
            t, _, dev, _ = problem(k, n, 1, 10 + s)
            sets.append(dev)
        dense = torch.randn(k, n, dtype=torch.float16, device="cuda")
        for m in ms:
            a = torch.randn(m, k, dtype=torch.float16, device="cuda")
            out = torch.empty(m, n, dtype=torch.float16, device="cuda")
            row = []
            for tuning in (None,) + tuple(f"splits={s}" for s in SWEEP_SPLITS):
                if tuning:
                    os.environ["OPT4GPTQ_WGMMA_TUNING"] = tuning
                else:
                    os.environ.pop("OPT4GPTQ_WGMMA_TUNING", None)
                try:
                    us = median_us(lambda: [opt4gptq.gptq_gemm(a, *d, None, True, 4, out=out, path="wgmma") for d in sets]) / len(sets)
                    row.append(f"{(tuning or 'plan').replace('splits=', 's')} {us:6.1f}")
                except Exception:  # noqa: BLE001
                    row.append(f"{tuning} -")
            os.environ.pop("OPT4GPTQ_WGMMA_TUNING", None)
            if m <= 64:
                mma = median_us(lambda: [opt4gptq.gptq_gemm(a, *d, None, True, 4, out=out, path="mma") for d in sets]) / len(sets)
                row.append(f"mma {mma:6.1f}")
            cublas = median_us(lambda: torch.matmul(a, dense, out=out))
            row.append(f"cuBLAS {cublas:6.1f}")
            print(f"{k}x{n} M={m:4d}: " + " | ".join(row), flush=True)


def once(k, n, m):
    t, a, dev, w = problem(k, n, m, 3)
    got, kernel = run(a, dev)
    print(kernel, rel(got, a.astype(np.float64) @ w))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "anatomy"
    if what == "anatomy":
        anatomy()
    elif what == "sweep":
        sweep()
    else:
        once(*(int(x) for x in sys.argv[2:5]))
