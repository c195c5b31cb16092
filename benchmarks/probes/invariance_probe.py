"""Batch invariance, measured before it is designed (issue 14): does row i of
gptq_gemm's output keep its bits when the same row is computed in a batch of
M rows, alone, or at another position? One table per layer shape, for the
default plan and for kernels and shapes forced one at a time. Development
tool: the spec will live in tests once the mode exists.

    python benchmarks/probes/invariance_probe.py            # on the GPU (torch CUDA)
    python benchmarks/probes/invariance_probe.py --cpu      # the CPU backend (numpy), a smoke run

For each setting and M it prints how many of the probed rows differ from the
same row computed alone (0 = invariant at that M) and the largest difference
in units of fp16 ulps; then, on Hopper, whether the wgmma block shapes agree
with each other at one fixed K split, and whether mma agrees with wgmma.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

import numpy as np

import opt4gptq
from opt4gptq import pack

ROWS = (1, 2, 3, 7, 8, 9, 16, 33, 64, 100, 128, 256, 1024)
LAYERS = ((4096, 4096), (11008, 4096), (4096, 22016))  # (K, N)
PROBED_ROWS = 4  # rows of each batch checked against themselves alone: first, last, two in between


@contextmanager
def environment(**values):
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Layer:
    """One shuffled 4-bit g128 layer (symmetric zeros as in sym=True checkpoints) and a pool of rows."""

    def __init__(self, k: int, n: int, rows: int, on_gpu: bool, seed: int = 11):
        rng = np.random.default_rng(seed)
        t = pack.random_gptq(k, n, 4, 128, rng=rng)
        self.a = rng.standard_normal((rows, k)).astype(np.float16)
        self.on_gpu = on_gpu
        qweight = t.qweight.copy()
        if on_gpu:
            import torch

            self.torch = torch
            self.weights = [torch.from_numpy(x).cuda() for x in (qweight, t.qzeros, t.scales)]
        else:
            self.weights = [qweight, t.qzeros, t.scales]
        opt4gptq.gptq_shuffle(self.weights[0], None, 4)

    def gemm(self, rows: np.ndarray, path=None) -> tuple[np.ndarray, str]:
        a = self.torch.from_numpy(rows).cuda() if self.on_gpu else rows
        out = opt4gptq.gptq_gemm(a, *self.weights, None, True, 4, path=path)
        kernel = opt4gptq.last_kernel()
        if self.on_gpu:
            self.torch.cuda.synchronize()
            out = out.cpu().numpy()
        return np.ascontiguousarray(out), kernel


def ulps(x: np.ndarray, y: np.ndarray) -> int:
    """Largest distance in fp16 ulps (sign-magnitude order) between two fp16 arrays."""
    def ordered(v):
        bits = v.view(np.uint16).astype(np.int32)
        return np.where(bits & 0x8000, 0x8000 - (bits & 0x7FFF), 0x8000 + bits)
    return int(np.abs(ordered(x) - ordered(y)).max()) if x.size else 0


def batch_against_alone(layer: Layer, m: int, path=None) -> tuple[int, int, str]:
    """(rows that differ, largest ulps, kernel) for a batch of m rows against each probed row alone
    and against the same batch rotated by one row (each row at another position)."""
    batch, kernel = layer.gemm(layer.a[:m], path)
    rotated, _ = layer.gemm(np.roll(layer.a[:m], 1, axis=0), path)
    probed = sorted({0, m - 1, m // 3, (2 * m) // 3})[:PROBED_ROWS]
    differ, worst = 0, 0
    for i in probed:
        alone, _ = layer.gemm(layer.a[i:i + 1], path)
        moved = rotated[(i + 1) % m:(i + 1) % m + 1]
        d = max(ulps(batch[i:i + 1], alone), ulps(batch[i:i + 1], moved))
        differ += d > 0
        worst = max(worst, d)
    return differ, worst, kernel


def table(layer: Layer, label: str, path=None, rows=ROWS) -> None:
    cells = []
    for m in rows:
        try:
            differ, worst, kernel = batch_against_alone(layer, m, path)
            cells.append(f"M={m}:{differ}/{min(PROBED_ROWS, m)}" + (f"({worst}u)" if worst else "") + f"[{kernel}]")
        except Exception as error:  # a forced kernel that cannot serve this M: say so, go on
            cells.append(f"M={m}:n/a({type(error).__name__})")
    print(f"  {label:28s} " + " ".join(cells), flush=True)


def hopper_cross_checks(layer: Layer) -> None:
    """At one fixed K split, do the wgmma block shapes agree per row, and does mma agree with wgmma?"""
    rows = layer.a[:8]
    results = {}
    for tile in range(8):
        with environment(OPT4GPTQ_WGMMA_TUNING=f"tile={tile},splits=1"):
            try:
                results[f"wgmma tile {tile}"], _ = layer.gemm(rows, "wgmma")
            except Exception as error:
                print(f"  wgmma tile {tile}: {type(error).__name__}: {error}")
    with environment(OPT4GPTQ_MMA_TUNING="cols=32,warps=16"):
        results["mma c32w16"], _ = layer.gemm(rows, "mma")
    reference = results.get("wgmma tile 0")
    for name, out in results.items():
        if reference is not None:
            print(f"  {name:14s} vs wgmma tile 0 (split 1): {ulps(out, reference)} ulps max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="probe the CPU backend with numpy arrays")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M values")
    args = parser.parse_args()
    rows = tuple(int(r) for r in args.rows.split(","))
    on_gpu = not args.cpu
    if on_gpu:
        import torch

        if not torch.cuda.is_available() or opt4gptq.backend() != "cuda":
            sys.exit("needs a CUDA build of opt4gptq and a CUDA device (or pass --cpu)")
        print(torch.cuda.get_device_name(), "compute capability", torch.cuda.get_device_capability())
    for k, n in LAYERS if on_gpu else ((1024, 512),):
        layer = Layer(k, n, max(rows), on_gpu)
        print(f"{k}x{n}: rows that differ from themselves alone or moved / probed rows [kernel]")
        table(layer, "default", rows=rows)
        if on_gpu:
            for tuning in ("tile=1,splits=1", "tile=1,splits=2", "tile=3,splits=2"):
                with environment(OPT4GPTQ_WGMMA_TUNING=tuning):
                    table(layer, f"wgmma {tuning}", "wgmma", rows)
            with environment(OPT4GPTQ_MMA_TUNING="cols=32,warps=16"):
                table(layer, "mma c32w16", "mma", tuple(r for r in rows if r <= 192))
            import torch

            if torch.cuda.get_device_capability() == (9, 0):
                hopper_cross_checks(layer)


if __name__ == "__main__":
    main()
