"""Kernel benchmark: every variant on the paper's models' layer shapes.

For each (model layer, M, variant) plus two torch peers measured in the same run,
torch's fp16 matmul on dense weights of the same shape and torch's own int4
kernel ("tinygemm", `torch._weight_int4pack_mm`, bf16 activations) on the same
quantized weights: median time per call (CUDA-graph replays, weights rotated
across enough copies that the L2 cannot hold them), effective bandwidth
(minimum bytes: packed weights, scales, zeros, activations, output) as GB/s and
as % of the device-to-device copy bandwidth measured in the same run, TFLOP/s,
and speedup over `baseline`. Prints a table; writes JSON and PNG charts.

    python benchmarks/bench_gemm.py --out benchmarks/results/h100
    python benchmarks/bench_gemm.py --quick          # tiny, also on a CPU-only build

The int4 peer ("torch int4", key `torch_int4`) gets the same 4-bit values and
group-128 scales as our kernels, converted to tinygemm's format: weights
`[N, K/2]` uint8 (even k in the high nibble) through
`torch._convert_weight_to_int4pack(w, innerKTiles=8)` on CUDA (torch >= 2.5;
the CPU twin `_convert_weight_to_int4pack_for_cpu` takes int32 `[N, K]`), and
`scales_and_zeros` bf16 `[K/group, N, 2]` with tinygemm's float zero
`w = (q - 8) * scale + zero`, so GPTQ's `w = scale * (q - z)` becomes
`zero = scale * (8 - z)`. Its output is checked once per layer against the
dequantized reference (relative error printed and kept in the JSON) before it
is timed; where torch lacks the ops, or the check fails, the peer is skipped
with the reason printed.

Two more peers run where their packages import (see benchmarks/peers.py, which
holds the adapters and the notes on both libraries): **humming** (key
`humming`, the quantized GEMM library vLLM uses, loaded the way vLLM's
`--quantization humming` loads a GPTQ checkpoint: GPTQ schema ->
`convert_humming` -> `HummingMethod.prepare_layer_meta` /
`transform_humming_layer`, called through `HummingMethod.forward_layer`) and
**gemlite** (key `gemlite`, Triton, `gemlite.helper.A16Wn(...).from_weights`
with the weights converted as gemlite's own vLLM plugin converts GPTQ).
Both get fp16 activations and the same GPTQ tensors as our kernels; each
(layer, M) is first checked against `a @ W` in float64 (relative error kept as
`<peer>_relerr`, two calls compared bit for bit as `<peer>_repeatable`, the
first call's wall time, JIT compile or autotune included, as
`<peer>_first_call_s`) and timed only if the error is below 1e-2. They are
timed like everything else, as CUDA-graph replays, falling back to eager
timing if a capture fails (`<peer>_timing`: "graph" or "eager").

By default the weights are symmetric, as sym=True GPTQ checkpoints are: every
stored zero 2^(bits-1) - 1 (z = 8 at 4 bits), which is what humming assumes
for sym=True (it drops qzeros and computes scale * (q - 8)); `--no-sym` gives
random zeros (the default before the humming peer), which humming can only
read after the +1 to GPTQ v2 zeros its GPTQ schema leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from typing import Callable, Dict, List

import numpy as np

import opt4gptq
from opt4gptq import pack
import peers as peer_lib
from provenance import git_commit

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


INT4_LABEL = "torch int4"
LABELS = {"path:default": "opt4gptq default", "torch_int4": INT4_LABEL, **peer_lib.LABELS}
INT4_INNER_K_TILES = 8
INT4_MAX_REL_ERR = 1e-2  # bf16 activations and bf16 scales/zeros: ~1e-3 expected; a wrong layout gives ~1


def label(column: str) -> str:
    return LABELS.get(column, column)


def random_weights(args, k: int, n: int, group_size: int, rng) -> "pack.GPTQTensors":
    """GPTQ v1 tensors for one layer; with args.sym every stored zero is 2**(bits-1) - 1 (a sym=True checkpoint)."""
    t = pack.random_gptq(k, n, args.bits, group_size, act_order=args.act_order, rng=rng)
    if args.sym:
        t.qzeros = pack.pack_cols(np.full((t.num_groups, n), (1 << (args.bits - 1)) - 1, dtype=np.int64), args.bits)
    return t


class Int4Peer:
    """torch's tinygemm int4 kernel on the device of the run, or a reason why not.

    CUDA/ROCm: `_convert_weight_to_int4pack` (uint8 [N, K/2] in, torch >= 2.5) and
    `_weight_int4pack_mm`. CPU: `_convert_weight_to_int4pack_for_cpu` (int32 [N, K]
    in) and `_weight_int4pack_mm_for_cpu`. Both take scales_and_zeros bf16
    [K/group, N, 2] and compute `x @ ((q - 8) * scale + zero)`.
    """

    def __init__(self, torch, device: str, bits: int, group_size: int, act_order: bool):
        self.torch, self.device, self.group_size = torch, device, group_size
        self.reason = None
        if device == "cpu":
            names = ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")
        else:
            names = ("_convert_weight_to_int4pack", "_weight_int4pack_mm")
        missing = [name for name in names if not hasattr(torch, name)]
        version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2] if x.isdigit())
        if missing:
            self.reason = f"torch {torch.__version__} has no {', '.join(missing)}"
        elif device != "cpu" and version < (2, 5):
            self.reason = f"torch {torch.__version__} < 2.5 (older int4pack contract: int32 input)"
        elif bits != 4:
            self.reason = f"tinygemm is 4-bit only (bits={bits})"
        elif group_size not in (32, 64, 128, 256):
            self.reason = f"tinygemm takes group sizes 32/64/128/256 (got {group_size})"
        elif act_order:
            self.reason = "tinygemm has no act-order (g_idx) support"
        if self.reason is None:
            self.convert, self.mm = (getattr(torch, name) for name in names)

    def tensors(self, qweight, qzeros, scales):
        """GPTQ v1 tensors (torch, on the device, 4-bit, no act-order) -> (packed, scales_and_zeros, W [K, N] fp32)."""
        torch = self.torch
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
        k8, n = qweight.shape
        q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15).reshape(k8 * 8, n)  # [K, N]
        groups = scales.shape[0]
        z = ((qzeros.unsqueeze(-1) >> shifts) & 15).reshape(groups, n) + 1  # v1: stored + 1
        s = scales.float()
        rows = torch.arange(k8 * 8, device=qweight.device) // (k8 * 8 // groups)
        weight = s[rows] * (q - z[rows]).float()  # the dequantized reference
        scales_and_zeros = torch.stack([s, s * (8 - z).float()], dim=-1).to(torch.bfloat16).contiguous()
        q_nk = q.t().contiguous()
        if self.device == "cpu":
            packed = self.convert(q_nk.to(torch.int32), INT4_INNER_K_TILES)
        else:
            packed = self.convert(((q_nk[:, ::2] << 4) | q_nk[:, 1::2]).to(torch.uint8).contiguous(), INT4_INNER_K_TILES)
        return packed, scales_and_zeros, weight

    def __call__(self, a_bf16, packed, scales_and_zeros):
        return self.mm(a_bf16, packed, self.group_size, scales_and_zeros)

    def check(self, a, packed, scales_and_zeros, weight) -> float:
        """Relative (Frobenius) error of the int4 output against a @ dequantized weights (fp32)."""
        torch = self.torch
        out = self(a.to(torch.bfloat16), packed, scales_and_zeros).float()
        ref = a.float() @ weight
        return float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref))


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

    def eager(self, calls: List[Callable[[], object]]) -> float:
        """The same median, launching every call from Python (for calls a CUDA graph cannot capture):
        where a call's GPU time is below its launch overhead this measures the launch."""
        torch = self.torch
        for call in calls:
            call()
        torch.cuda.synchronize()
        samples = []
        for _ in range(self.repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for call in calls:
                call()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3 / len(calls))
        return statistics.median(samples)


def make_peers(torch, args) -> list:
    """humming / gemlite adapters (benchmarks/peers.py) for the peers asked for, each printed with its state."""
    objs = peer_lib.make(torch, args.peers, bits=args.bits, group_size=args.group_size, act_order=args.act_order,
                         sym=args.sym, ms=args.m, humming_tuning=args.humming_tuning,
                         gemlite_autotune=args.gemlite_autotune)
    for p in objs:
        print(f"{p.label}: skipped ({p.reason})" if p.reason else f"{p.label}: {json.dumps(p.settings())}")
    return objs


def peer_report(objs) -> dict:
    return {p.key: {"label": p.label, "skipped": p.reason, "settings": None if p.reason else p.settings(),
                    "layers": {}} for p in objs}


def prepare_peers(torch, active, tensors, copies: int, shape: str, log: dict) -> dict:
    """{peer key: one prepared handle per weight copy}; a peer that fails here is skipped for this layer."""
    sets = {}
    for p in active:
        try:
            start = time.perf_counter()
            sets[p.key] = [p.prepare(*tensors) for _ in range(copies)]
            torch.cuda.synchronize()
            log[p.key]["layers"][shape] = {"prepare_s": time.perf_counter() - start}
        except Exception as error:  # a peer's failure must not cost the whole run
            print(f"{label(p.key)}: skipped for {shape}: {type(error).__name__}: {error}")
            log[p.key]["layers"][shape] = {"error": f"{type(error).__name__}: {error}"}
    return sets


def time_peers(torch, timer, active, sets: dict, a, weight64, result: dict) -> None:
    """Check each peer on this (layer, M) against a @ W in float64, then time it (graph replays, else eagerly)."""
    m = a.shape[0]
    for p in active:
        if p.key not in sets:
            continue
        handles = sets[p.key]
        try:
            result[f"{p.key}_first_call_s"] = peer_lib.timed_first_call(torch, p, handles[0], a)
            err, same = peer_lib.check(torch, p, handles[0], a, weight64)
            result[f"{p.key}_relerr"], result[f"{p.key}_repeatable"] = err, same
            result[f"{p.key}_kernel"] = p.kernel(handles[0], m)
            if err > peer_lib.MAX_REL_ERR:
                print(f"{p.label}: not timed at M={m}: relative error {err:.2e} against the float64 reference "
                      f"(limit {peer_lib.MAX_REL_ERR:g})")
                continue
            calls = [lambda h=h, p=p: p(h, a) for h in handles]
            try:
                result[p.key], result[f"{p.key}_timing"] = timer(calls), "graph"
            except Exception as error:
                print(f"{p.label}: CUDA graph capture failed at M={m} ({type(error).__name__}: {error}); timed eagerly")
                torch.cuda.synchronize()
                result[p.key], result[f"{p.key}_timing"] = timer.eager(calls), "eager"
        except Exception as error:
            print(f"{p.label}: skipped at M={m}: {type(error).__name__}: {error}")
            result[f"{p.key}_error"] = f"{type(error).__name__}: {error}"


def print_peer_layer(active, rows: List[dict], shape: str, log: dict) -> None:
    """One line per peer and layer: worst error, repeatability, first-call (JIT / autotune) seconds."""
    for p in active:
        errs = [r[f"{p.key}_relerr"] for r in rows if f"{p.key}_relerr" in r]
        if not errs:
            continue
        same = [r[f"{p.key}_repeatable"] for r in rows if f"{p.key}_repeatable" in r]
        first = sum(r.get(f"{p.key}_first_call_s", 0.0) for r in rows)
        timing = sorted({r[f"{p.key}_timing"] for r in rows if f"{p.key}_timing" in r})
        log[p.key]["layers"].setdefault(shape, {})["first_calls_s"] = first
        print(f"{p.label}: {shape} relative error <= {max(errs):.2e} against the float64 reference; "
              f"repeatable bits: {'yes' if all(same) else 'no' if not any(same) else 'at some M'}; "
              f"first calls (JIT / autotune included) {first:.1f} s; timed {'/'.join(timing) or 'never'}")


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
    int4 = Int4Peer(torch, "cuda", args.bits, args.group_size, args.act_order)
    if int4.reason:
        print(f"{INT4_LABEL}: skipped ({int4.reason})")
    peer_objs = make_peers(torch, args)
    active = [p for p in peer_objs if p.reason is None]
    peer_log = peer_report(peer_objs)
    for model in args.models:
        for k, n in MODELS[model]:
            t = random_weights(args, k, n, args.group_size, rng)
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
            int4_sets, int4_err = [], None
            if int4.reason is None:
                try:
                    packed, sz, weight = int4.tensors(*(torch.from_numpy(x).cuda() for x in (t.qweight, t.qzeros, t.scales)))
                    probe = torch.randn(max(args.m), k, dtype=torch.float16, device="cuda")
                    int4_err = int4.check(probe, packed, sz, weight)
                    del weight, probe
                    if int4_err > INT4_MAX_REL_ERR:
                        print(f"{INT4_LABEL}: skipped for {k}x{n}: relative error {int4_err:.2e} against the "
                              f"dequantized reference (limit {INT4_MAX_REL_ERR:g})")
                    else:
                        print(f"{INT4_LABEL}: {k}x{n} relative error {int4_err:.2e} against the dequantized reference")
                        int4_sets = [(packed.clone(), sz.clone()) for _ in range(copies)]
                    del packed, sz
                except Exception as error:  # a contract change in torch must not cost the whole run
                    print(f"{INT4_LABEL}: skipped for {k}x{n}: {type(error).__name__}: {error}")
            peer_sets, weight64, layer_rows = {}, None, []
            if active:
                originals = [torch.from_numpy(x).cuda() for x in (t.qweight, t.qzeros, t.scales)]
                weight64 = peer_lib.dequantize(torch, *originals, bits=args.bits)
                peer_sets = prepare_peers(torch, active, originals, copies, f"{k}x{n}", peer_log)
                del originals
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
                    forced = None if path == "default" else path  # "default": what the dispatch table picks
                    calls = [lambda s=s, p=forced: opt4gptq.gptq_gemm(a, s[0], s[1], s[2], perm_t, True, args.bits,
                                                                       out=out, path=p) for s in sets]
                    result[f"path:{path}"] = timer(calls)
                    result[f"path:{path}_kernel"] = opt4gptq.last_kernel()
                result["torch_fp16"] = timer([lambda w=w: torch.matmul(a, w, out=out) for w in dense])
                if int4_err is not None:
                    result["torch_int4_relerr"] = int4_err
                if int4_sets:
                    a_bf16 = a.to(torch.bfloat16)
                    result["torch_int4"] = timer([lambda s=s: int4(a_bf16, s[0], s[1]) for s in int4_sets])
                time_peers(torch, timer, active, peer_sets, a, weight64, result)
                rows.append(result)
                layer_rows.append(result)
                line = "  ".join(f"{v} {result[v] * 1e6:8.1f}" for v in columns_of(args) if v in result)
                print(f"{model:13s} {k:5d}x{n:<5d} M={m:<5d} {line}  (us)", flush=True)
            print_peer_layer(active, layer_rows, f"{k}x{n}", peer_log)
            del sets, dense, int4_sets, peer_sets, weight64
            torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": bandwidth, "rows": rows,
            "torch_int4_skipped": int4.reason, "peers": peer_log}


def run_cpu(args) -> dict:
    """A tiny CPU run so the script is exercised where no GPU exists (CI)."""
    rng = np.random.default_rng(args.seed)
    rows = []
    try:
        import torch
    except ImportError:
        torch = None
    int4 = Int4Peer(torch, "cpu", args.bits, 128, args.act_order) if torch is not None else None
    int4_reason = "torch not installed" if int4 is None else int4.reason
    if int4_reason:
        print(f"{INT4_LABEL}: skipped ({int4_reason})")
    peer_log = peer_report(make_peers(torch, args))  # GPU only: here each says why it is skipped
    for m in args.m:
        k, n = 256, 256
        t = random_weights(args, k, n, 128, rng)
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
        if int4_reason is None:
            try:
                packed, sz, weight = int4.tensors(*(torch.from_numpy(x) for x in (t.qweight, t.qzeros, t.scales)))
                a_t = torch.from_numpy(a)
                err = int4.check(a_t, packed, sz, weight)
                print(f"{INT4_LABEL}: {k}x{n} M={m} relative error {err:.2e} against the dequantized reference")
                result["torch_int4_relerr"] = err
                if err <= INT4_MAX_REL_ERR:
                    a_bf16 = a_t.to(torch.bfloat16)
                    start = time.perf_counter()
                    int4(a_bf16, packed, sz)
                    result["torch_int4"] = time.perf_counter() - start
                else:
                    print(f"{INT4_LABEL}: not timed: error above {INT4_MAX_REL_ERR:g}")
            except Exception as error:
                int4_reason = f"{type(error).__name__}: {error}"
                print(f"{INT4_LABEL}: skipped ({int4_reason})")
        rows.append(result)
    return {"device": f"cpu ({platform.processor() or platform.machine()})", "copy_bandwidth_gbs": None, "rows": rows,
            "torch_int4_skipped": int4_reason, "peers": peer_log}


def columns_of(args) -> List[str]:
    return args.variants + [f"path:{p}" for p in args.paths] + ["torch_fp16", "torch_int4"] + args.peers


def peer_columns(rows: List[dict]) -> List[str]:
    """torch_fp16, then torch_int4, humming and gemlite where every row has them (each can be skipped as a
    whole, per layer or, for the last two, per M)."""
    optional = ("torch_int4",) + peer_lib.NAMES
    return ["torch_fp16"] + [c for c in optional if rows and all(c in r for r in rows)]


def summarize(report: dict, variants: List[str]) -> List[str]:
    """Per model and M: the four layers summed, speedup over baseline, % of bandwidth."""
    bw = report["copy_bandwidth_gbs"]
    lines = []
    extra = [key for key in report["rows"][0] if key.startswith("path:") and not key.endswith("_kernel")] \
        if report["rows"] else []
    columns = variants + extra + peer_columns(report["rows"])
    header = f"{'model':13s} {'M':>5s} " + " ".join(f"{label(v):>14s}" for v in columns)
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
    return lines + rates(report, variants + extra)


def rates(report: dict, ours: List[str]) -> List[str]:
    """Per model and M, the fastest of our columns as effective GB/s, % of the
    copy bandwidth and TFLOP/s (four layers summed), next to cuBLAS fp16's TFLOP/s."""
    bw = report["copy_bandwidth_gbs"]
    if not bw or not report["rows"]:
        return []
    lines = ["", f"{'model':13s} {'M':>5s} {'fastest of ours':>22s} {'GB/s':>8s} {'% copy':>7s} {'TFLOP/s':>8s} "
             f"{'fp16 TFLOP/s':>12s}"]
    by_key: Dict[tuple, List[dict]] = {}
    for row in report["rows"]:
        by_key.setdefault((row["model"], row["m"]), []).append(row)
    for (model, m), layer_rows in by_key.items():
        best = min(ours, key=lambda v: sum(r[v] for r in layer_rows))
        seconds = sum(r[best] for r in layer_rows)
        nbytes = sum(r["bytes"] for r in layer_rows)
        flops = sum(2.0 * r["m"] * r["k"] * r["n"] for r in layer_rows)
        fp16 = flops / sum(r["torch_fp16"] for r in layer_rows) / 1e12
        lines.append(f"{model:13s} {m:5d} {label(best):>22s} {nbytes / seconds / 1e9:8.0f} "
                     f"{100 * nbytes / seconds / 1e9 / bw:6.1f}% {flops / seconds / 1e12:8.2f} {fp16:12.2f}")
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
    peers = [c for c in peer_columns(rows) if c != "torch_fp16"]
    forced = [key for key in rows[0] if key.startswith("path:") and not key.endswith("_kernel")] if rows else []
    others = [v for v in variants if v != "baseline"] + forced + peers
    width = 0.8 / max(1, len(others))
    for i, v in enumerate(others):
        gains = []
        for model in models:
            sel = [r for r in rows if r["model"] == model and r["m"] <= 16]
            gains.append((sum(r["baseline"] for r in sel) / sum(r[v] for r in sel) - 1) * 100 if sel else 0)
        ax.bar(np.arange(len(models)) + i * width, gains, width, label=label(v))
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
    for v in variants + forced + peer_columns(rows):
        pct = []
        for m in ms:
            sel = [r for r in rows if r["m"] == m]
            pct.append(100 * sum(r["bytes"] for r in sel) / sum(r[v] for r in sel) / 1e9 / bw)
        ax.plot(ms, pct, marker="o", label=label(v))
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
    parser.add_argument("--paths", default="", help="also time these kernels forced (mma, exllama, skinny, tiled, dense), "
                        "or 'default': no variant named, the dispatch table's choice (what vLLM users get)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true", help="act-order weights (perm applied to activations)")
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                        help="symmetric weights: every stored zero 2^(bits-1) - 1, as in sym=True checkpoints, for "
                        "every kernel of the run (--no-sym: random zeros; humming then needs them as v2 zeros)")
    parser.add_argument("--peers", default=",".join(peer_lib.NAMES),
                        help="comma list of optional peers to try (" + ", ".join(peer_lib.NAMES) + "), or 'none'; "
                        "each is skipped with the reason printed where it cannot run")
    parser.add_argument("--humming-tuning", default="per-m", choices=("per-m", "all"),
                        help="per-m: compile only the kernels humming's heuristics pick for the --m values (the same "
                        "kernels vLLM launches at those M); all: vLLM's call as is, ~92 kernels per layer shape")
    parser.add_argument("--gemlite-autotune", default="fast", choices=("fast", "default", "max"),
                        help="gemlite's Triton autotune mode (fast: its default)")
    parser.add_argument("--repeats", type=int, default=20, help="timed graph replays per point (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one model, few M (GPU), tiny shapes (CPU)")
    parser.add_argument("--out", default=None, help="directory for JSON and PNG (default: no files)")
    args = parser.parse_args(argv)
    args.models = list(MODELS) if args.models == "all" else args.models.split(",")
    args.m = [int(x) for x in args.m.split(",")]
    args.variants = args.variants.split(",")
    args.paths = [p for p in args.paths.split(",") if p]
    args.peers = [] if args.peers in ("", "none") else args.peers.split(",")
    unknown = [p for p in args.peers if p not in peer_lib.NAMES]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)} (known: {', '.join(peer_lib.NAMES)})")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")

    gpu = opt4gptq.backend() != "cpu" and bool(opt4gptq.devices())
    if args.quick:
        args.models, args.m, args.repeats = ["llama2-7b"], ([1, 16, 64] if gpu else [1, 8]), min(args.repeats, 10)
    report = run_gpu(args) if gpu else run_cpu(args)
    report.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                  opt4gptq=opt4gptq.__version__, backend=opt4gptq.backend(), bits=args.bits,
                  group_size=args.group_size, act_order=args.act_order, sym=args.sym, variants=args.variants)
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
