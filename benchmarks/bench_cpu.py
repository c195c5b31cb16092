"""CPU benchmark: opt4gptq's CPU backend against torch's own CPU int4 kernel and
dense fp32 matmul, on the paper's models' layer shapes (bench_gemm.MODELS).

For each layer (K x N, 4-bit, group 128, GPTQ v1 zeros) and M in 1, 4, 16, 64,
128, in one run: median ms per call of

- opt4gptq: `gptq_gemm` on numpy arrays (fp16 activations, exllama path),
- torch int4: `torch.ops.aten._weight_int4pack_mm_for_cpu` on the same 4-bit
  values converted by `_convert_weight_to_int4pack_for_cpu` (bf16 activations,
  bf16 scales and tinygemm's float zeros; bench_gemm.Int4Peer does the
  conversion), checked against a float64 reference before it is timed,
- dense fp32: `torch.matmul` with the dequantized fp32 weights,

then effective bandwidth (minimum bytes: packed weights, scales, zeros,
activations, output; bench_gemm.min_bytes) as GB/s and as % of the memory
bandwidth measured in the same run (a large numpy copy on every core). Samples
of the three are interleaved, so a noisy neighbour hits all of them alike;
each sample repeats the call for at least `--sample-ms`, after a pause
(`--settle-ms`) that lets the previous contender's idle threads stop spinning
and one untimed call. Writes JSON and a PNG.

    python benchmarks/bench_cpu.py                       # every model, ~5 min on 2 cores
    python benchmarks/bench_cpu.py --models llama2-7b --m 1,16,128
    python benchmarks/bench_cpu.py --quick               # seconds; CI runs this
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opt4gptq  # noqa: E402
from opt4gptq import pack  # noqa: E402
from bench_gemm import MODELS, INT4_MAX_REL_ERR, Int4Peer, min_bytes  # noqa: E402
from provenance import git_commit  # noqa: E402

DEFAULT_M = [1, 4, 16, 64, 128]
GROUP_SIZE = 128
BITS = 4


def copy_bandwidth(cores: int, megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s (bytes read + written) of a large numpy copy split over `cores` threads (numpy releases the GIL)."""
    src = np.ones(megabytes << 18, dtype=np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), cores)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def copy(lo: int, hi: int) -> None:
        np.copyto(dst[lo:hi], src[lo:hi])

    samples = []
    for _ in range(repeats):
        threads = [threading.Thread(target=copy, args=b) for b in bounds]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        samples.append(time.perf_counter() - start)
    return 2 * src.nbytes / min(samples) / 1e9


def calls_per_sample(fn: Callable[[], object], sample_s: float) -> int:
    """Calls that fill one sample, from the fastest of three timed calls (one slow call must not shrink samples)."""
    once = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        once.append(time.perf_counter() - start)
    return max(1, int(sample_s / max(min(once), 1e-6)))


def interleaved_medians(fns: Dict[str, Callable[[], object]], samples: int, sample_s: float,
                        settle_s: float) -> Dict[str, float]:
    """Median seconds per call of each function, sampling them in turn.

    Before each sample: a pause of settle_s, then one untimed call. torch's
    OpenMP (libgomp) threads keep spinning for milliseconds after a torch call
    (as our helper thread does for 0.2 ms); on a 2-core machine a contender
    sampled inside that window ran up to ~1.5x slower. The pause lets every
    runtime's idle threads go to sleep, so each contender is timed on a quiet
    machine and pays its own wake-up in the untimed call."""
    for fn in fns.values():
        fn()  # warm caches and thread pools
    counts = {name: calls_per_sample(fn, sample_s) for name, fn in fns.items()}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            time.sleep(settle_s)
            fn()
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            times[name].append((time.perf_counter() - start) / counts[name])
    return {name: statistics.median(values) for name, values in times.items()}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


class Layer:
    """One K x N layer's weights in every form the three contenders read."""

    def __init__(self, torch, int4: Optional[Int4Peer], k: int, n: int, rng):
        self.k, self.n = k, n
        t = pack.random_gptq(k, n, BITS, group_size=GROUP_SIZE, rng=rng)
        self.qweight, self.qzeros, self.scales = t.qweight.copy(), t.qzeros, t.scales
        self.weight64 = t.dequantize()
        # gptq_shuffle with the identity permutation: the layout vLLM's exllama path serves.
        opt4gptq.gptq_shuffle(self.qweight, np.arange(k, dtype=np.int32), BITS)
        self.perm = np.arange(k, dtype=np.int32)
        self.dense = torch.from_numpy(self.weight64.astype(np.float32)) if torch is not None else None
        self.int4 = None
        self.int4_reason = None if int4 is not None and int4.reason is None else getattr(int4, "reason", "no torch")
        if self.int4_reason is None:
            try:
                packed, sz, _ = int4.tensors(*(torch.from_numpy(x) for x in (t.qweight, t.qzeros, t.scales)))
                self.int4 = (packed, sz)
            except Exception as error:  # an older torch may lack the CPU pack op's contract
                self.int4_reason = f"{type(error).__name__}: {error}"

    def ours(self, a: np.ndarray) -> np.ndarray:
        return opt4gptq.gptq_gemm(a, self.qweight, self.qzeros, self.scales, self.perm, True, BITS)


def measure(torch, int4: Optional[Int4Peer], layer: Layer, m: int, args, rng) -> dict:
    a = rng.standard_normal((m, layer.k)).astype(np.float16)
    ref = a.astype(np.float64) @ layer.weight64
    row = {"k": layer.k, "n": layer.n, "m": m, "bytes": min_bytes(m, layer.k, layer.n, BITS, GROUP_SIZE)}
    out = np.full((m, layer.n), np.nan, dtype=np.float16)
    opt4gptq.gptq_gemm(a, layer.qweight, layer.qzeros, layer.scales, layer.perm, True, BITS, out=out)
    row["ours_relerr"] = relative_error(out, ref)
    if row["ours_relerr"] > 1e-3:
        raise SystemExit(f"opt4gptq is wrong on {layer.k}x{layer.n} M={m}: relative error {row['ours_relerr']:.2e}")
    fns: Dict[str, Callable[[], object]] = {"ours": lambda: layer.ours(a)}
    if torch is not None:
        a32 = torch.from_numpy(a.astype(np.float32))
        fns["dense_fp32"] = lambda: torch.matmul(a32, layer.dense)
        if layer.int4 is not None:
            a_bf16 = torch.from_numpy(a).to(torch.bfloat16)
            packed, sz = layer.int4
            err = relative_error(int4(a_bf16, packed, sz).float().numpy(), ref)
            row["torch_int4_relerr"] = err
            if err <= INT4_MAX_REL_ERR:
                fns["torch_int4"] = lambda: int4(a_bf16, packed, sz)
            else:
                row["torch_int4_skipped"] = f"relative error {err:.2e} against float64 above {INT4_MAX_REL_ERR:g}"
        else:
            row["torch_int4_skipped"] = layer.int4_reason
    for name, seconds in interleaved_medians(fns, args.samples, args.sample_ms / 1e3, args.settle_ms / 1e3).items():
        row[f"{name}_ms"] = seconds * 1e3
    row["ours_gbs"] = row["bytes"] / (row["ours_ms"] / 1e3) / 1e9
    if "torch_int4_ms" in row:
        row["torch_int4_gbs"] = row["bytes"] / (row["torch_int4_ms"] / 1e3) / 1e9
        row["ratio_vs_int4"] = row["ours_ms"] / row["torch_int4_ms"]
    return row


def print_row(model: str, row: dict, bandwidth: float) -> None:
    int4 = f"{row['torch_int4_ms']:9.3f}" if "torch_int4_ms" in row else "        -"
    dense = f"{row['dense_fp32_ms']:9.3f}" if "dense_fp32_ms" in row else "        -"
    ratio = f"{row['ratio_vs_int4']:5.2f}x" if "ratio_vs_int4" in row else "     -"
    if "torch_int4_skipped" in row:
        print(f"torch int4 not timed: {row['torch_int4_skipped']}")
    print(f"{model:13s} {row['k']:6d}x{row['n']:<6d} M={row['m']:<4d} ours {row['ours_ms']:9.3f} ms  int4 {int4} ms  "
          f"fp32 {dense} ms  ours/int4 {ratio}  {row['ours_gbs']:6.1f} GB/s ({100 * row['ours_gbs'] / bandwidth:3.0f}%)",
          flush=True)


def summarize(rows: List[dict]) -> Dict[str, dict]:
    """Per M over distinct layers: geometric mean and worst of ours / torch int4."""
    summary = {}
    for m in sorted({r["m"] for r in rows}):
        seen, ratios = set(), []
        for r in rows:
            if r["m"] == m and "ratio_vs_int4" in r and (r["k"], r["n"]) not in seen:
                seen.add((r["k"], r["n"]))
                ratios.append(r["ratio_vs_int4"])
        if ratios:
            summary[str(m)] = {"geomean": float(np.exp(np.mean(np.log(ratios)))), "worst": max(ratios),
                               "best": min(ratios), "layers": len(ratios)}
    return summary


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ms = sorted({r["m"] for r in rows})
    layers = sorted({(r["k"], r["n"]) for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for k, n in layers:
        pts = [(r["m"], r) for r in rows if (r["k"], r["n"]) == (k, n)]
        left.plot([m for m, r in pts if "ratio_vs_int4" in r], [r["ratio_vs_int4"] for m, r in pts if "ratio_vs_int4" in r],
                  marker="o", lw=1, alpha=0.7, label=f"{k}x{n}")
        right.plot([m for m, _ in pts], [r["ours_gbs"] for _, r in pts], marker="o", lw=1, alpha=0.7)
    left.axhline(1.0, color="k", lw=0.8)
    left.axhline(1.5, color="r", ls="--", lw=0.8, label="target M=1,16 (1.5x)")
    left.axhline(1.2, color="m", ls=":", lw=0.8, label="target M=128 (1.2x)")
    left.set(xscale="log" if any("ratio_vs_int4" in r for r in rows) else "linear", xlabel="M", ylabel="opt4gptq time / torch int4 time", xticks=ms, xticklabels=ms,
             title="opt4gptq CPU vs torch _weight_int4pack_mm_for_cpu (lower is better)")
    left.legend(fontsize=6, ncol=2)
    right.axhline(result["copy_bandwidth_gbs"], color="k", ls="--", lw=0.8, label="numpy copy bandwidth")
    right.set(xscale="log", xlabel="M", ylabel="GB/s (minimum bytes)", xticks=ms, xticklabels=ms,
              title="opt4gptq effective bandwidth")
    right.legend(fontsize=8)
    fig.suptitle(f"{result['device']}, {result['threads']} threads, commit {result['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="comma list of " + ", ".join(MODELS) + " (default all)")
    parser.add_argument("--shapes", default=None, help="comma list of KxN layers instead of --models (e.g. 4096x4096)")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="comma list of M")
    parser.add_argument("--samples", type=int, default=7, help="interleaved samples per contender (median)")
    parser.add_argument("--sample-ms", type=float, default=30.0, help="minimum length of one sample")
    parser.add_argument("--settle-ms", type=float, default=50.0,
                        help="pause before each sample so other runtimes' idle threads stop spinning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results/cpu; --quick: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="one small layer, M=1 and 16, few samples (CI)")
    args = parser.parse_args(argv)
    if opt4gptq.backend() != "cpu":
        print(f"note: {opt4gptq.backend()} build; this measures its CPU backend")
    try:
        import torch
    except ImportError:
        torch = None
        print("torch is not installed: only opt4gptq is timed")
    if args.quick:
        layers = {"tiny": [(512, 256)]}
        ms, args.samples, args.sample_ms, args.settle_ms = [1, 16], 3, 2.0, 1.0
    elif args.shapes:
        layers = {"custom": [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]}
        ms = [int(x) for x in args.m.split(",")]
    else:
        names = list(MODELS) if args.models == "all" else args.models.split(",")
        layers = {name: MODELS[name] for name in names}
        ms = [int(x) for x in args.m.split(",")]
    int4 = Int4Peer(torch, "cpu", BITS, GROUP_SIZE, False) if torch is not None else None
    if int4 is not None and int4.reason:
        print(f"torch int4: skipped ({int4.reason})")
    cores = os.cpu_count() or 1
    bandwidth = copy_bandwidth(cores, 64 if args.quick else 512)
    threads = int(os.environ.get("OPT4GPTQ_NUM_THREADS", "0")) or cores
    print(f"memory bandwidth (numpy copy, {cores} threads): {bandwidth:.1f} GB/s; opt4gptq threads: {threads}; "
          f"torch threads: {torch.get_num_threads() if torch else '-'}")
    rng = np.random.default_rng(args.seed)
    rows: List[dict] = []
    done: Dict[tuple, List[dict]] = {}
    for model, shapes in layers.items():
        for k, n in shapes:
            if (k, n) not in done:
                layer = Layer(torch, int4, k, n, rng)
                done[(k, n)] = [measure(torch, int4, layer, m, args, rng) for m in ms]
                del layer
            for row in done[(k, n)]:
                rows.append({"model": model, **row})
                print_row(model, row, bandwidth)
    summary = summarize(rows)
    for m, s in summary.items():
        print(f"M={m:>4s}: ours / torch int4 geomean {s['geomean']:.2f}x, worst {s['worst']:.2f}x, best {s['best']:.2f}x "
              f"over {s['layers']} layers")
    result = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {cores} cores)",
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "threads": threads,
        "torch": getattr(torch, "__version__", None),
        "torch_threads": torch.get_num_threads() if torch else None,
        "copy_bandwidth_gbs": bandwidth,
        "bits": BITS, "group_size": GROUP_SIZE, "samples": args.samples, "sample_ms": args.sample_ms,
        "summary": summary,
        "rows": rows,
    }
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="opt4gptq-cpu.") if args.quick else \
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_cpu_quick" if args.quick else "bench_cpu")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, stem + ".png")
    except ImportError:
        print("matplotlib is not installed: no PNG")
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
