"""`python -m opt4gptq` (or `opt4gptq`): does this install work here, and how fast is it?

Reports version, backend and devices; checks every path (each bit width,
act-order on/off, use_exllama on/off, few and many rows) against a float64
reference on the best backend available; times a Llama-2-7B layer; prints a
verdict. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

import opt4gptq
from opt4gptq import pack

REL_TOL = 1e-3  # fp16 output rounding is <= 4.9e-4 relative; see tests/conftest.py


class Target:
    """Where checks run: a name, and how to move numpy arrays there and back."""

    def __init__(self, name: str, to: Callable[[np.ndarray], Any], back: Callable[[Any], np.ndarray],
                 sync: Callable[[], None] = lambda: None, timer: Optional[Callable] = None):
        self.name, self.to, self.back, self.sync, self.timer = name, to, back, sync, timer


def _cpu_target() -> Target:
    return Target("cpu (numpy)", lambda x: x.copy(), np.asarray)


def _gpu_target() -> Tuple[Optional[Target], str]:
    if opt4gptq.backend() == "cpu":
        return None, "this build has no GPU backend (install with OPT4GPTQ_GPU=cuda or rocm)"
    if not opt4gptq.devices():
        return None, f"this {opt4gptq.backend()} build sees no GPU"
    try:
        import torch
    except ImportError:
        return None, "torch is not installed; GPU checks drive the kernels through torch"
    if not torch.cuda.is_available():
        return None, "torch sees no GPU"

    def timer(fn: Callable[[], Any], reps: int) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / reps

    name = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return Target(name, lambda x: torch.from_numpy(x.copy()).cuda(), lambda x: x.cpu().numpy(),
                  torch.cuda.synchronize, timer), ""


def _check_one(target: Target, rng: np.random.Generator, m: int, k: int, n: int, bits: int,
               act_order: bool, use_exllama: bool) -> float:
    """Relative error of one poisoned-output call against the float64 reference."""
    t = pack.random_gptq(k, n, bits, 128, act_order=act_order, rng=rng)
    a = rng.standard_normal((m, k)).astype(np.float16)
    qweight = target.to(t.qweight)
    if use_exllama:
        perm = target.to(np.argsort(t.g_idx, kind="stable").astype(np.int32)) if act_order else None
        opt4gptq.gptq_shuffle(qweight, perm, bits)
        index = perm
    else:
        index = target.to(t.g_idx)
    out = target.to(np.full((m, n), np.nan, np.float16))
    opt4gptq.gptq_gemm(target.to(a), qweight, target.to(t.qzeros), target.to(t.scales), index,
                       use_exllama, bits, out=out)
    target.sync()
    got = target.back(out).astype(np.float64)
    ref = pack.reference_gemm(a, t.qweight, t.qzeros, t.scales, t.g_idx, bits)
    if np.isnan(got).any():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def run_checks(target: Target, rng: np.random.Generator) -> List[str]:
    """Every path on `target`; returns the failures."""
    failures = []
    rows = (1, 7, 64)  # decode (skinny kernel) and prefill (tiled kernel)
    for bits in (2, 3, 4, 8):
        worst, count = 0.0, 0
        for act_order, use_exllama in ((False, True), (True, True), (True, False)):
            for m in rows:
                err = _check_one(target, rng, m, 512, 256, bits, act_order, use_exllama)
                worst, count = max(worst, err), count + 1
                if not err < REL_TOL:
                    failures.append(f"bits={bits} act_order={act_order} use_exllama={use_exllama} M={m}: "
                                    f"relative error {err:.2e}")
        status = "ok  " if worst < REL_TOL else "FAIL"
        print(f"  {status} {bits}-bit  {count} cases (act-order on/off, exllama/alt, M={rows})  "
              f"worst relative error {worst:.1e}")
    return failures


def time_llama_layer(target: Target, rng: np.random.Generator) -> None:
    """One Llama-2-7B projection (4096 x 4096, 4-bit, group 128) at decode and prefill sizes."""
    k = n = 4096
    t = pack.random_gptq(k, n, 4, 128, rng=rng)
    args = [target.to(x) for x in (t.qweight, t.qzeros, t.scales)]
    opt4gptq.gptq_shuffle(args[0], None, 4)
    weight_bytes = t.qweight.nbytes + t.qzeros.nbytes + t.scales.nbytes
    for m in ((1, 16, 256) if target.timer else (1, 16)):
        a = target.to(rng.standard_normal((m, k)).astype(np.float16))
        call = lambda: opt4gptq.gptq_gemm(a, *args, None, True, 4)  # noqa: E731
        call()
        target.sync()
        if target.timer is not None:
            seconds = target.timer(call, 50)
        else:
            start = time.perf_counter()
            call()
            seconds = time.perf_counter() - start
        moved = weight_bytes + 2 * m * (k + n)
        print(f"  M={m:<4} {seconds * 1e6:10.1f} us   {moved / seconds / 1e9:8.1f} GB/s   "
              f"{2 * m * k * n / seconds / 1e12:7.2f} TFLOP/s")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="opt4gptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-timing", action="store_true", help="skip the Llama-2-7B layer timing")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random problems (default: fresh)")
    options = parser.parse_args(argv)

    devices = opt4gptq.devices()
    print(f"opt4gptq {opt4gptq.__version__}  backend: {opt4gptq.backend()}  "
          f"devices: {', '.join(devices) if devices else 'none'}")
    seed = options.seed if options.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)

    gpu, why_not = _gpu_target()
    targets = [gpu] if gpu is not None else []
    if gpu is None:
        print(f"GPU checks skipped: {why_not}")
    targets.append(_cpu_target())

    failures: List[str] = []
    for target in targets:
        print(f"checking against the float64 reference on {target.name} (seed {seed}):")
        failures += [f"{target.name}: {f}" for f in run_checks(target, rng)]
    if not options.no_timing:
        target = targets[0]
        print(f"Llama-2-7B 4096x4096 layer, 4-bit group 128, on {target.name}, per eager call "
              "(host overhead included; benchmarks/bench_gemm.py times kernels alone):")
        time_llama_layer(target, rng)

    if failures:
        print(f"FAILED: {len(failures)} check(s) off the reference:")
        for failure in failures:
            print(f"  {failure}")
        return 1
    print(f"OK: opt4gptq works here ({', '.join(t.name for t in targets)}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
