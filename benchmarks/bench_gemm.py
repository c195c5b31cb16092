"""Kernel benchmark: every variant on the paper's models' layer shapes.

For each (model layer, M, variant) plus torch's fp16 matmul on dense weights of
the same shape: median time per call (CUDA-graph replays, weights rotated
across enough copies that the L2 cannot hold them), effective bandwidth
(minimum bytes: packed weights, scales, zeros, activations, output) as GB/s and
as % of the device-to-device copy bandwidth measured in the same run, TFLOP/s,
and speedup over `baseline`. Prints a table; writes JSON and PNG charts.

    python benchmarks/bench_gemm.py --out benchmarks/results/h100
    python benchmarks/bench_gemm.py --quick          # tiny, also on a CPU-only build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List

import numpy as np

import opt4gptq
from opt4gptq import pack

# K x N of the four linear layers of one decoder layer (qkv, o, gate+up, down).
MODELS: Dict[str, List[tuple]] = {
    "llama2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "codellama-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama3-8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
    "llama-13b": [(5120, 15360), (5120, 5120), (5120, 27648), (13824, 5120)],
    "qwen1.5-4b": [(2560, 7680), (2560, 2560), (2560, 13824), (6912, 2560)],
    "qwen1.5-1.8b": [(2048, 6144), (2048, 2048), (2048, 11008), (5504, 2048)],
}
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024]
L2_FLUSH_BYTES = 256 << 20  # rotate weights over at least this much (H100 L2: 50 MB)


def min_bytes(m: int, k: int, n: int, bits: int, group_size: int) -> int:
    groups = k // group_size
    return k * n * bits // 8 + groups * n * 2 + groups * n * bits // 8 + m * k * 2 + m * n * 2


def git_commit() -> str:
    """OPT4GPTQ_COMMIT (for copies of the tree without .git), else git's HEAD."""
    if os.environ.get("OPT4GPTQ_COMMIT"):
        return os.environ["OPT4GPTQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        return "unknown"


class GpuTimer:
    """Median seconds per call of `calls` (one per weight copy), as CUDA-graph replays."""

    def __init__(self, torch, repeats: int):
        self.torch, self.repeats = torch, repeats

    def __call__(self, calls: List[Callable[[], object]]) -> float:
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for call in calls:  # warm-up off the graph: first-use validation, lazy init
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        graph.replay()
        samples = []
        for _ in range(self.repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / len(calls))
        return statistics.median(samples)


def copy_bandwidth(torch) -> float:
    """Device-to-device copy GB/s (bytes read + written), measured now."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    stop.record()
    stop.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / 20
    return 2 * src.numel() / seconds / 1e9


def run_gpu(args) -> dict:
    import torch

    timer = GpuTimer(torch, args.repeats)
    bandwidth = copy_bandwidth(torch)
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth {bandwidth:.0f} GB/s")
    rng = np.random.default_rng(args.seed)
    rows = []
    for model in args.models:
        for k, n in MODELS[model]:
            t = pack.random_gptq(k, n, args.bits, args.group_size, act_order=args.act_order, rng=rng)
            perm = np.argsort(t.g_idx, kind="stable").astype(np.int32) if args.act_order else None
            weight_bytes = min_bytes(0, k, n, args.bits, args.group_size)
            copies = max(2, min(16, L2_FLUSH_BYTES // weight_bytes + 1))
            qweight = torch.from_numpy(t.qweight).cuda()
            perm_t = None if perm is None else torch.from_numpy(perm).cuda()
            opt4gptq.gptq_shuffle(qweight, perm_t, args.bits)
            sets = [(qweight.clone(), torch.from_numpy(t.qzeros).cuda(), torch.from_numpy(t.scales).cuda())
                    for _ in range(copies)]
            dense = [torch.randn(k, n, dtype=torch.float16, device="cuda") * 0.02
                     for _ in range(max(2, min(16, L2_FLUSH_BYTES // (k * n * 2) + 1)))]
            for m in args.m:
                a = torch.randn(m, k, dtype=torch.float16, device="cuda")
                out = torch.empty(m, n, dtype=torch.float16, device="cuda")
                result = {"model": model, "k": k, "n": n, "m": m, "bytes": min_bytes(m, k, n, args.bits, args.group_size)}
                for variant in args.variants:
                    calls = [lambda s=s, v=variant: opt4gptq.gptq_gemm(a, s[0], s[1], s[2], perm_t, True, args.bits,
                                                                        out=out, variant=v) for s in sets]
                    result[variant] = timer(calls)
                    result[f"{variant}_kernel"] = opt4gptq.last_kernel()
                for path in args.paths:  # the other kernels, forced, for the dispatch table
                    calls = [lambda s=s, p=path: opt4gptq.gptq_gemm(a, s[0], s[1], s[2], perm_t, True, args.bits,
                                                                     out=out, path=p) for s in sets]
                    result[f"path:{path}"] = timer(calls)
                result["torch_fp16"] = timer([lambda w=w: torch.matmul(a, w, out=out) for w in dense])
                rows.append(result)
                line = "  ".join(f"{v} {result[v] * 1e6:8.1f}" for v in args.variants + columns_of(args)[len(args.variants):])
                print(f"{model:13s} {k:5d}x{n:<5d} M={m:<5d} {line}  (us)", flush=True)
            del sets, dense
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bandwidth, "rows": rows}


def run_cpu(args) -> dict:
    """A tiny CPU run so the script is exercised where no GPU exists (CI)."""
    rng = np.random.default_rng(args.seed)
    rows = []
    for m in args.m:
        k, n = 256, 256
        t = pack.random_gptq(k, n, args.bits, 128, rng=rng)
        a = rng.standard_normal((m, k)).astype(np.float16)
        result = {"model": "tiny", "k": k, "n": n, "m": m, "bytes": min_bytes(m, k, n, args.bits, 128)}
        for variant in args.variants:
            start = time.perf_counter()
            opt4gptq.gptq_gemm(a, t.qweight, t.qzeros, t.scales, None, True, args.bits, variant=variant)
            result[variant] = time.perf_counter() - start
            result[f"{variant}_kernel"] = opt4gptq.last_kernel()
        start = time.perf_counter()
        a.astype(np.float32) @ rng.standard_normal((k, n)).astype(np.float32)
        result["torch_fp16"] = time.perf_counter() - start  # numpy stand-in on the CPU
        rows.append(result)
    return {"device": f"cpu ({platform.processor() or platform.machine()})", "copy_bandwidth_gbs": None, "rows": rows}


def columns_of(args) -> List[str]:
    return args.variants + [f"path:{p}" for p in args.paths] + ["torch_fp16"]


def summarize(report: dict, variants: List[str]) -> List[str]:
    """Per model and M: the four layers summed, speedup over baseline, % of bandwidth."""
    bw = report["copy_bandwidth_gbs"]
    lines = []
    extra = [key for key in report["rows"][0] if key.startswith("path:")] if report["rows"] else []
    columns = variants + extra + ["torch_fp16"]
    header = f"{'model':13s} {'M':>5s} " + " ".join(f"{v:>14s}" for v in columns)
    lines.append(header + ("   floor_us" if bw else ""))
    by_key: Dict[tuple, List[dict]] = {}
    for row in report["rows"]:
        by_key.setdefault((row["model"], row["m"]), []).append(row)
    for (model, m), layer_rows in by_key.items():
        total = {v: sum(r[v] for r in layer_rows) for v in columns}
        base = total.get("baseline")
        cells = []
        for v in columns:
            speed = f"{base / total[v]:.2f}x" if base else ""
            cells.append(f"{total[v] * 1e6:8.1f} {speed:>5s}")
        floor = sum(r["bytes"] for r in layer_rows) / (bw * 1e9) * 1e6 if bw else None
        lines.append(f"{model:13s} {m:5d} " + " ".join(cells) + (f"   {floor:8.1f}" if floor else ""))
    return lines


def charts(report: dict, variants: List[str], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, bw = report["rows"], report["copy_bandwidth_gbs"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    ms = sorted({r["m"] for r in rows})
    # Figure-2 style: per model, gain of each variant over baseline (layers summed, decode M <= 16).
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(variants) - 1)
    others = [v for v in variants if v != "baseline"]
    for i, v in enumerate(others):
        gains = []
        for model in models:
            sel = [r for r in rows if r["model"] == model and r["m"] <= 16]
            gains.append((sum(r["baseline"] for r in sel) / sum(r[v] for r in sel) - 1) * 100 if sel else 0)
        ax.bar(np.arange(len(models)) + i * width, gains, width, label=v)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(models)) + width * (len(others) - 1) / 2, models)
    ax.set_ylabel("kernel time gain over baseline, %  (M <= 16, 4 layers summed)")
    ax.set_title(f"Opt4GPTQ ablation, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "gain_over_baseline.png"), dpi=120)
    plt.close(fig)
    if not bw:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v in variants + ["torch_fp16"]:
        pct = []
        for m in ms:
            sel = [r for r in rows if r["m"] == m]
            pct.append(100 * sum(r["bytes"] for r in sel) / sum(r[v] for r in sel) / 1e9 / bw)
        ax.plot(ms, pct, marker="o", label=v)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (rows of activations)")
    ax.set_ylabel("% of copy bandwidth (minimum bytes / time)")
    ax.set_title(f"Effective bandwidth, all models, {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "bandwidth_vs_m.png"), dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="comma list of " + ", ".join(MODELS) + " (default all)")
    parser.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="comma list of M")
    parser.add_argument("--variants", default=",".join(opt4gptq.variants()))
    parser.add_argument("--paths", default="", help="also time these kernels forced (skinny, tiled, dense)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true", help="act-order weights (perm applied to activations)")
    parser.add_argument("--repeats", type=int, default=20, help="timed graph replays per point (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one model, few M (GPU), tiny shapes (CPU)")
    parser.add_argument("--out", default=None, help="directory for JSON and PNG (default: no files)")
    args = parser.parse_args(argv)
    args.models = list(MODELS) if args.models == "all" else args.models.split(",")
    args.m = [int(x) for x in args.m.split(",")]
    args.variants = args.variants.split(",")
    args.paths = [p for p in args.paths.split(",") if p]
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    gpu = opt4gptq.backend() != "cpu" and bool(opt4gptq.devices())
    if args.quick:
        args.models, args.m, args.repeats = ["llama2-7b"], ([1, 16, 64] if gpu else [1, 8]), min(args.repeats, 10)
    report = run_gpu(args) if gpu else run_cpu(args)
    report.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                  opt4gptq=opt4gptq.__version__, backend=opt4gptq.backend(), bits=args.bits,
                  group_size=args.group_size, act_order=args.act_order, variants=args.variants)
    lines = summarize(report, args.variants)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gemm.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "bench_gemm_summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            charts(report, args.variants, args.out)
        except ImportError:
            print("matplotlib not installed: no charts", file=sys.stderr)
    print(f"\nfour layers summed, microseconds and speedup over baseline ({report['device']}):")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
