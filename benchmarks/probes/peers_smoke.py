"""Smoke test of the GEMM peers (humming, gemlite) on one GPU: does each run, is it right, how fast, how long its JIT.

    python benchmarks/probes/peers_smoke.py                       # Llama-2-7B 4096x4096 and 4096x22016, M = 1, 16, 64, 256
    python benchmarks/probes/peers_smoke.py --out benchmarks/results/h200/peers_smoke.json

Standalone (torch and benchmarks/peers.py; opt4gptq only for an optional
reference row). For each layer shape it builds symmetric 4-bit group-128 GPTQ v1
tensors (every stored zero 7, as in sym=True checkpoints), and for each peer and
M: the relative error against a @ W in float64, whether two calls give the same
bits, and the median time per call (CUDA events over CUDA-graph replays of one
call per weight copy, the copies rotated past the L2; eager launches where a
capture fails, marked so). The first calls' wall time (JIT compile / Triton
autotune included) is reported per peer and shape. Then, unless --no-asym, the
sym=False check behind peers.py's zero-point note: humming fed GPTQ v1 qzeros as
stored (what vLLM does with a v1 checkpoint) against qzeros + 1 (v2). A peer that
is missing is reported with the reason, not a crash. Defaults keep the whole run
under ~3 minutes on an H200 from a cold JIT cache: humming compiles only the
kernels its heuristics pick for these M ("per-m"), gemlite autotunes in its small
"default" mode (pass --gemlite-autotune fast for gemlite's own default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import peers as peer_lib  # noqa: E402  (benchmarks/peers.py)

L2_FLUSH_BYTES = 256 << 20


def graph_time(torch, calls, repeats: int):
    """(median seconds per call, "graph") over CUDA-graph replays of `calls`, or (..., "eager") if capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run = graph.replay
    except Exception as error:
        print(f"    CUDA graph capture failed ({type(error).__name__}: {error}); timing eager launches")
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for call in calls:
                call()
    run()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3 / len(calls))
    return statistics.median(samples), mode


def copies_for(nbytes: int, cap: int) -> int:
    return max(2, min(cap, L2_FLUSH_BYTES // nbytes + 1))


def ours(torch):
    """opt4gptq's default GPU dispatch as an optional reference row, or None."""
    try:
        import opt4gptq

        if opt4gptq.backend() == "cpu" or not opt4gptq.devices():
            return None
        return opt4gptq
    except Exception:
        return None


def run_shape(torch, args, k, n, active, rows, jit):
    gen = torch.Generator(device="cuda").manual_seed(args.seed + k * 7 + n)
    qweight, qzeros, scales = peer_lib.random_gptq(torch, k, n, 128, generator=gen, sym=True)
    weight64 = peer_lib.dequantize(torch, qweight, qzeros, scales)
    weight_bytes = k * n // 2 + (k // 128) * n * 2 + (k // 128) * n // 2
    copies = copies_for(weight_bytes, args.max_copies)
    acts = {m: torch.randn(m, k, generator=gen, device="cuda").half() for m in args.m}
    shape = f"{k}x{n}"
    print(f"\n{shape}: {copies} weight copies per peer ({copies * weight_bytes / 2**20:.0f} MiB)", flush=True)

    for p in active:
        entry = jit.setdefault(p.key, {}).setdefault(shape, {})
        try:
            start = time.perf_counter()
            handles = [p.prepare(qweight, qzeros, scales) for _ in range(copies)]
            torch.cuda.synchronize()
            entry["prepare_s"] = time.perf_counter() - start
        except Exception as error:
            entry["error"] = f"prepare: {type(error).__name__}: {error}"
            print(f"  {p.label}: prepare failed: {type(error).__name__}: {error}")
            continue
        first_total = 0.0
        for m in args.m:
            a = acts[m]
            row = {"peer": p.key, "shape": shape, "m": m}
            try:
                row["first_call_s"] = peer_lib.timed_first_call(torch, p, handles[0], a)
                first_total += row["first_call_s"]
                row["relerr"], row["repeatable"] = peer_lib.check(torch, p, handles[0], a, weight64)
                row["kernel"] = p.kernel(handles[0], m)
                if row["relerr"] > peer_lib.MAX_REL_ERR:
                    row["note"] = "error above limit: not timed"
                else:
                    row["seconds"], row["timing"] = graph_time(
                        torch, [lambda h=h, p=p, a=a: p(h, a) for h in handles], args.repeats)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            print("  " + format_row(row), flush=True)
        entry["first_calls_s"] = first_total
        del handles
        torch.cuda.empty_cache()

    # reference rows: torch fp16 (cuBLAS, dense weights) and, where built for this GPU, opt4gptq's default dispatch
    dense = [torch.randn(k, n, generator=gen, device="cuda").half() * 0.02 for _ in range(copies_for(k * n * 2, 16))]
    for m in args.m:
        a = acts[m]
        out = torch.empty(m, n, dtype=torch.float16, device="cuda")
        seconds, mode = graph_time(torch, [lambda w=w: torch.matmul(a, w, out=out) for w in dense], args.repeats)
        row = {"peer": "torch_fp16", "shape": shape, "m": m, "seconds": seconds, "timing": mode}
        rows.append(row)
        print("  " + format_row(row), flush=True)
    del dense
    lib = ours(torch)
    if lib is not None:
        try:
            sets = []
            for _ in range(copies):
                qw = qweight.clone()
                lib.gptq_shuffle(qw, None, 4)
                sets.append((qw, qzeros, scales))
            for m in args.m:
                a = acts[m]
                out = torch.empty(m, n, dtype=torch.float16, device="cuda")
                got = lib.gptq_gemm(a, *sets[0], None, True, 4)
                err = peer_lib.relative_error(torch, got, a.double() @ weight64)
                seconds, mode = graph_time(
                    torch, [lambda s=s: lib.gptq_gemm(a, *s, None, True, 4, out=out) for s in sets], args.repeats)
                row = {"peer": "opt4gptq", "shape": shape, "m": m, "relerr": err, "seconds": seconds, "timing": mode,
                       "kernel": lib.last_kernel()}
                rows.append(row)
                print("  " + format_row(row), flush=True)
        except Exception as error:
            print(f"  opt4gptq reference row failed: {type(error).__name__}: {error}")
    del weight64
    torch.cuda.empty_cache()


def asym_check(torch, args, results):
    """humming with sym=False on v1 zeros as stored vs + 1, and gemlite on the same tensors (one shape, M=16)."""
    k, n, m = 4096, 4096, 16
    gen = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    qweight, qzeros, scales = peer_lib.random_gptq(torch, k, n, 128, generator=gen, sym=False, max_stored_zero=14)
    weight64 = peer_lib.dequantize(torch, qweight, qzeros, scales)
    a = torch.randn(m, k, generator=gen, device="cuda").half()
    ref = a.double() @ weight64
    print(f"\nsym=False check, {k}x{n} M={m}, GPTQ v1 stored zeros uniform in [0, 14]:")
    hum = peer_lib.HummingPeer(torch, sym=False, ms=[m], tuning=args.humming_tuning)
    if hum.reason:
        print(f"  humming: skipped ({hum.reason})")
    else:
        for as_stored, what in ((True, "v1 qzeros as stored (vLLM on a v1 checkpoint)"), (False, "qzeros + 1 (v2)")):
            try:
                start = time.perf_counter()
                layer = hum.prepare(qweight, qzeros, scales, zeros_as_stored=as_stored)
                out = hum(layer, a)
                torch.cuda.synchronize()
                err = peer_lib.relative_error(torch, out, ref)
                results[f"humming_sym_false_{'v1_as_stored' if as_stored else 'v2'}_relerr"] = err
                print(f"  humming, {what}: relative error {err:.3e}  ({time.perf_counter() - start:.1f} s incl. JIT)")
            except Exception as error:
                print(f"  humming, {what}: failed: {type(error).__name__}: {error}")
    gem = peer_lib.GemlitePeer(torch, sym=False, autotune=args.gemlite_autotune)
    if gem.reason:
        print(f"  gemlite: skipped ({gem.reason})")
    else:
        try:
            out = gem(gem.prepare(qweight, qzeros, scales), a)
            torch.cuda.synchronize()
            err = peer_lib.relative_error(torch, out, ref)
            results["gemlite_sym_false_relerr"] = err
            print(f"  gemlite (zeros = stored + 1, as its vLLM plugin): relative error {err:.3e}")
        except Exception as error:
            print(f"  gemlite: failed: {type(error).__name__}: {error}")


def format_row(row) -> str:
    label = peer_lib.LABELS.get(row["peer"], row["peer"])
    parts = [f"{label:15s} {row['shape']:>10s} M={row['m']:<4d}"]
    if "relerr" in row:
        parts.append(f"relerr {row['relerr']:.2e}")
    if "repeatable" in row:
        parts.append(f"same bits {'yes' if row['repeatable'] else 'NO '}")
    if "seconds" in row:
        parts.append(f"{row['seconds'] * 1e6:8.1f} us ({row['timing']})")
    if "first_call_s" in row:
        parts.append(f"first call {row['first_call_s']:6.2f} s")
    if "kernel" in row:
        parts.append(f"[{row['kernel']}]")
    for key in ("note", "error"):
        if key in row:
            parts.append(f"{key}: {row[key]}")
    return "  ".join(parts)


def summary(rows, jit, results) -> list:
    lines = ["", "summary (median us per call; relative error vs float64; 'same' = two calls bitwise identical):"]
    lines.append(f"{'peer':15s} {'shape':>10s} {'M':>5s} {'us':>9s} {'rel err':>9s} {'same':>5s} {'timing':>7s}")
    for row in rows:
        label = peer_lib.LABELS.get(row["peer"], row["peer"])
        us = f"{row['seconds'] * 1e6:9.1f}" if "seconds" in row else f"{'-':>9s}"
        err = f"{row['relerr']:9.2e}" if "relerr" in row else f"{'-':>9s}"
        same = ("yes" if row["repeatable"] else "no") if "repeatable" in row else "-"
        timing = row.get("timing", "error" if "error" in row else "-")
        lines.append(f"{label:15s} {row['shape']:>10s} {row['m']:5d} {us} {err} {same:>5s} {timing:>7s}")
    lines.append("")
    lines.append(f"{'peer':15s} {'shape':>10s} {'prepare s':>10s} {'first calls s (JIT/autotune)':>29s}")
    for key, shapes in jit.items():
        for shape, entry in shapes.items():
            prep = f"{entry['prepare_s']:10.2f}" if "prepare_s" in entry else f"{'-':>10s}"
            first = f"{entry['first_calls_s']:29.2f}" if "first_calls_s" in entry else f"{entry.get('error', '-'):>29s}"
            lines.append(f"{peer_lib.LABELS.get(key, key):15s} {shape:>10s} {prep} {first}")
    for key, value in results.items():
        lines.append(f"{key}: {value:.3e}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x22016", help="comma list of KxN")
    parser.add_argument("--m", default="1,16,64,256", help="comma list of M")
    parser.add_argument("--peers", default=",".join(peer_lib.NAMES))
    parser.add_argument("--humming-tuning", default="per-m", choices=("per-m", "all"))
    parser.add_argument("--gemlite-autotune", default="default", choices=("fast", "default", "max"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-copies", type=int, default=8, help="at most this many weight copies per peer")
    parser.add_argument("--no-asym", action="store_true", help="skip the sym=False zero-point check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.m = [int(x) for x in args.m.split(",")]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    names = [] if args.peers in ("", "none") else args.peers.split(",")
    wall = time.perf_counter()

    try:
        import torch
    except ImportError:
        print("torch not installed: nothing to run")
        return 0
    print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    if not torch.cuda.is_available():
        print("no CUDA device: every peer skipped")
        for p in peer_lib.make(torch, names, bits=4, group_size=128, act_order=False,
                               sym=True, ms=args.m):
            print(f"{p.label}: skipped ({p.reason})")
        return 0
    print(f"device {torch.cuda.get_device_name()}  HUMMING_CACHE_DIR={os.environ.get('HUMMING_CACHE_DIR', '~/.humming/cache')}")
    start = time.perf_counter()
    objs = peer_lib.make(torch, names, bits=4, group_size=128, act_order=False, sym=True, ms=args.m,
                         humming_tuning=args.humming_tuning, gemlite_autotune=args.gemlite_autotune)
    print(f"peers imported in {time.perf_counter() - start:.1f} s")
    for p in objs:
        print(f"{p.label}: " + (f"skipped ({p.reason})" if p.reason else json.dumps(p.settings())))
    active = [p for p in objs if p.reason is None]

    rows, jit, results = [], {}, {}
    for k, n in shapes:
        run_shape(torch, args, k, n, active, rows, jit)
    if not args.no_asym:
        asym_check(torch, args, results)
    lines = summary(rows, jit, results)
    lines.append(f"\ntotal wall time {time.perf_counter() - wall:.1f} s")
    print("\n".join(lines))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "peers": {p.key: {"skipped": p.reason, "settings": None if p.reason else p.settings()}
                                 for p in objs},
                       "rows": rows, "jit": jit, "sym_false": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
