"""Optional GEMM peers for bench_gemm.py and probes/peers_smoke.py: humming and gemlite.

Each peer is a small class: ``.reason`` is None when it can run here, otherwise
why not (not installed, no CUDA device, a setting it cannot express);
``.prepare(qweight, qzeros, scales)`` turns GPTQ v1 tensors (torch, on the GPU:
qweight int32 [K/8, N] packed along K lowest bits first, qzeros int32 [G, N/8]
storing zero - 1, scales fp16 [G, N]) into the peer's own form once, outside
the timed region; ``peer(handle, a)`` is the timed call (fp16 a [M, K] ->
fp16 [M, N]). Nothing here imports torch, humming or gemlite at module load, so
the CPU-only CI run of bench_gemm.py can import this file.

humming (PyPI ``humming-kernels``, 0.1.20 read; github inclusionAI/humming, the
quantized GEMM library vLLM uses). How vLLM loads a GPTQ checkpoint into it
(vllm/model_executor/layers/quantization/humming.py, ``HummingConfig`` ->
``HummingLinearMethod``), reproduced by :class:`HummingPeer`:

1. ``humming.schema.BaseWeightSchema.from_config(quantization_config)`` with the
   checkpoint's ``{"quant_method": "gptq", "bits": 4, "group_size": 128,
   "sym": True, "desc_act": False}`` gives a ``GPTQWeightSchema``
   (humming/schema/gptq.py). Its ``get_tensors_attrs`` names the checkpoint
   tensors: qweight int32 [K/8, N], scales param dtype [G, N], qzeros int32
   [G, N/8], g_idx int32 [K] (read, never used: ``to_humming_schema`` asserts
   ``not desc_act``).
2. ``schema.convert_humming(tensors, shape_n_stacks=[N], shape_k_stacks=[K],
   param_dtype=fp16)`` (humming/schema/base.py) -> a ``HummingWeightSchema``
   (b_dtype uint4, bs_dtype fp16, group 128, has_zero_point = not sym) and
   {"weight": qweight.T [N, K/8] int32, "weight_scale": scales.T [N, G] fp16,
   "zero_point": qzeros.T [N/8, G] int32 (sym=False only)}. With sym=True the
   qzeros are dropped and ``convert_symmetric_integer_weight``
   (humming/schema/humming.py) recodes the uint4 weight as the offset-binary
   float4e0m3 type, i.e. w = scale * (q - 8): the stored zeros must all be 7
   (z = 8) for this to be the checkpoint's weight.
3. ``HummingInputSchema().convert_humming(...)`` (16-bit activations, no input
   scales).
4. ``humming.layer.HummingMethod.prepare_layer_meta(layer, shape_n=N,
   shape_k=K, weight_schema, input_schema, pad_n_to_multiple=256,
   pad_k_to_multiple=128, has_bias=False, torch_dtype=fp16)`` and
   ``HummingMethod.transform_humming_layer(layer)`` (humming/layer.py,
   humming/transform.py ``transform_humming_tensors``): repacks the weight
   into the kernel's layout (``ops.repack_weight``), permutes scales and zero
   points, and stores them as the layer's ``weight`` / ``weight_scale`` /
   ``zero_point`` parameters.
5. The only workspace is ``layer.locks``: int32 zeros for the stream-K
   reduction (vLLM registers ``torch.zeros(1024, int32)``; humming's own
   ``HummingLayer`` 2048); the launcher checks its size when the chosen kernel
   uses stream-K (humming/csrc/launcher/tensor.h ``check_tensor_locks``).
6. Forward: ``HummingMethod.forward_layer(layer, inputs=x.view(-1, K),
   compute_config=json.dumps({"use_batch_invariant": False,
   "use_f16_accum": False, "gemm_type": "dense"}))`` (vLLM's
   VLLM_BATCH_INVARIANT / VLLM_HUMMING_USE_F16_ACCUM switches, here at
   humming's ``ComputeConfig`` defaults) -> ``humming_forward``
   (humming/forward.py) -> ``ops.humming_gemm`` (humming/ops/gemm.py). Output
   fp16 [M, N], allocated per call.

JIT: the first ``humming_gemm`` call of a layer shape compiles kernels
(``HummingKernel.prepare_kernels``, humming/kernel/humming.py). With no
tuning config it compiles one kernel per distinct heuristic config over the
whole M range (``DeviceHeuristics.get_configs``, humming/tune/base.py: M = 1,
2, 4, 8 and every multiple of 8 up to 8192 on sm_90; 92 distinct configs per
Llama-2-7B layer on a mocked H200, compiled in parallel threads). The compiler
is NVRTC through humming's bundled ``nvrtc_compile`` helper when
``cuda.bindings.nvrtc`` imports, nvcc only with HUMMING_COMPILER=nvcc
(humming/jit/runtime.py ``_get_compiler``); it needs a CUDA toolkit of
torch's CUDA major (/usr/local/cuda* or the pip ``nvidia/cu13`` tree, with
nvrtc.h, cuda_runtime.h and CCCL headers; humming/utils/cuda.py). Cubins are
cached under HUMMING_CACHE_DIR (default ~/.humming/cache). ``tuning="per-m"``
(the default here) passes, as ``tuning_config``, only the heuristic configs of
the M values the run uses, as [lo, hi, config] intervals
(``get_heuristics_config(meta, shape_m=M)``; the launcher takes the interval
with lo < M <= hi, humming/csrc/launcher/launcher.cpp): the same kernel vLLM
launches for those M, without compiling the other ~90. ``tuning="all"`` is
vLLM's call as is.

CUDA graphs: the launcher (libhumming_launcher.so, prebuilt for torch >= 2.11)
launches with cuLaunchKernelEx on torch's current stream, allocates its output
and tensor-map buffer through torch, and does no host synchronisation, so the
call can be captured once its kernels are compiled (vLLM captures it). The
benchmark warms it up outside the capture and falls back to eager timing
(recorded as such) if a capture fails.

Zero points with sym=False: ``GPTQWeightSchema._convert_humming`` passes
qzeros on as ``zero_point`` unchanged (no +1), and the kernel subtracts the
stored 4-bit value itself: ``dequant_single_zero_point``
(humming/include/humming/datatype/dequant_single.cuh) turns ``qzp & 0xF``
into an fp16 by the same magic-number trick as the weight, and humming's
reference ``dequantize_weight`` (humming/utils/weight.py) computes
``(q - zero_point) * scale``. So humming reads GPTQ zeros as the v2 format
(z = stored), with no checkpoint_format field to tell v1 from v2 (the schema's
fields are bits, group_size, desc_act, sym). A v1 checkpoint (AutoGPTQ,
GPTQModel's default on save: stored = z - 1) comes out as
w' = scale * (q - z + 1) = w + scale: every weight off by one step, a relative
output error of about 1 / rms(q - z) (0.15 for uniform random q and z, more for
real checkpoints whose q cluster near z), consistent with the 0.2-0.3 measured
before. A v1 stored 15 (z = 16) has no 4-bit v2 form at all. For comparison,
gemlite's vLLM plugin adds the 1 (gemlite/vllm/schemes.py
``_normalize_zeros(gptq_v1_plus_one=True)``). :class:`HummingPeer` gives
humming stored + 1 for sym=False data (refusing a layer with a stored 15), or
the stored value as is with ``prepare(..., zeros_as_stored=True)`` (what vLLM
does with a v1 checkpoint; probes/peers_smoke.py measures both).

gemlite (PyPI ``gemlite``, 0.6.0.post2 read; github mobiusml/gemlite, Triton):
``gemlite.helper.A16Wn(device, dtype=fp16).from_weights(W_q, scales, zeros,
W_nbits=4, group_size=128)`` with W_q uint8 [N, K] (one value per byte),
scales [N, G] and zeros [N, G] in the activation dtype, w = (q - zero) * scale
(HQQ convention, float zeros) -> a ``GemLiteLinearTriton`` module
(gemlite/core.py ``pack``: packs W_q over K into int32 and, in its default fma
mode, stores zeros as -zero * scale so the kernel computes q * scale + that);
``layer(a)`` is the forward (``forward_functional``, a torch custom op picking
GEMV_REVSPLITK for M <= 4, GEMM_SPLITK below 64, GEMM from 64; the split
kernels accumulate with atomics into a zeroed output). From GPTQ v1: unpack
qweight to [K, N] and transpose, zeros = unpacked qzeros + 1, scales.T, the
same conversion as gemlite's own vLLM plugin
(gemlite/vllm/schemes.py ``GemliteA16W4GroupLinearMethod``). Triton
autotunes on the first call of every (M bucket, N, K) unless a config file for
the device was loaded (gemlite ships configs/h100.json but none for H200, and
picks one only when its tag is in the device name): ``autotune`` sets
gemlite's mode ("fast", its default; "default": 1-2 configs; "max"). Importing
gemlite needs a CUDA device (gemlite/core.py reads the device name at import).
"""

from __future__ import annotations

import importlib.util
import json
import time
from typing import Dict, List, Optional, Sequence, Tuple

MAX_REL_ERR = 1e-2  # fp16 math gives ~1e-3; a wrong layout or zero convention gives > 0.1
NAMES = ("humming", "gemlite")
LABELS = {"humming": "humming (vLLM)", "gemlite": "gemlite"}


# ---------------------------------------------------------------------------
# GPTQ tensors in torch (the peers' inputs and the float64 reference)
# ---------------------------------------------------------------------------


def unpack_rows(torch, packed, bits: int = 4):
    """int32 [K * bits / 32, N] packed along K, lowest bits first -> int32 [K, N]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(torch, packed, bits: int = 4):
    """int32 [G, N * bits / 32] packed along N, lowest bits first -> int32 [G, N]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(packed.shape[0], packed.shape[1] * per)


def _to_int32_words(torch, words):
    """int64 values in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(torch, values, bits: int = 4):
    """[K, N] integers in [0, 2**bits) -> int32 [K * bits / 32, N] (inverse of unpack_rows)."""
    per = 32 // bits
    k, n = values.shape
    v = values.to(torch.int64).reshape(k // per, per, n)
    words = sum(v[:, j, :] << (bits * j) for j in range(per))
    return _to_int32_words(torch, words).contiguous()


def pack_cols(torch, values, bits: int = 4):
    """[G, N] integers in [0, 2**bits) -> int32 [G, N * bits / 32] (inverse of unpack_cols)."""
    per = 32 // bits
    g, n = values.shape
    v = values.to(torch.int64).reshape(g, n // per, per)
    words = sum(v[:, :, j] << (bits * j) for j in range(per))
    return _to_int32_words(torch, words).contiguous()


def symmetric_qzeros(torch, groups: int, n: int, bits: int = 4, device=None):
    """qzeros of a sym=True GPTQ v1 checkpoint: every stored zero 2**(bits-1) - 1 (z = 2**(bits-1))."""
    stored = torch.full((groups, n), (1 << (bits - 1)) - 1, dtype=torch.int32, device=device)
    return pack_cols(torch, stored, bits)


def random_gptq(torch, k: int, n: int, group_size: int = 128, *, generator=None, device="cuda",
                sym: bool = True, max_stored_zero: int = 14):
    """Random 4-bit GPTQ v1 tensors (qweight, qzeros, scales) on `device`.

    q uniform in [0, 16); sym=True: every stored zero 7 (z = 8); sym=False:
    stored zeros uniform in [0, max_stored_zero] (14 keeps z = stored + 1
    within 4 bits, so a v2 form exists). Scales fp16 uniform in [0.002, 0.02]."""
    groups = k // group_size
    q = torch.randint(0, 16, (k, n), generator=generator, device=device, dtype=torch.int32)
    if sym:
        stored = torch.full((groups, n), 7, dtype=torch.int32, device=device)
    else:
        stored = torch.randint(0, max_stored_zero + 1, (groups, n), generator=generator, device=device,
                               dtype=torch.int32)
    scales = (torch.rand((groups, n), generator=generator, device=device) * 0.018 + 0.002).half()
    return pack_rows(torch, q), pack_cols(torch, stored), scales


def dequantize(torch, qweight, qzeros, scales, bits: int = 4, v2: bool = False, dtype=None):
    """GPTQ tensors (no act-order) -> W [K, N] = scale * (q - z), z = stored + 1 (v1) or stored (v2).

    float64 by default: the reference every peer is checked against."""
    dtype = torch.float64 if dtype is None else dtype
    q = unpack_rows(torch, qweight, bits)
    k = q.shape[0]
    groups = scales.shape[0]
    z = unpack_cols(torch, qzeros, bits).to(dtype) + (0 if v2 else 1)
    rows = torch.arange(k, device=qweight.device) // (k // groups)
    return scales.to(dtype)[rows] * (q.to(dtype) - z[rows])


def relative_error(torch, out, ref) -> float:
    """Frobenius-norm relative error of `out` against `ref` (in float64)."""
    ref = ref.double()
    return float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref))


def check(torch, peer, handle, a, weight64) -> Tuple[float, bool]:
    """(relative error of peer(handle, a) against a @ W in float64, whether two calls give identical bits)."""
    first = peer(handle, a).clone()
    second = peer(handle, a)
    torch.cuda.synchronize()
    ref = a.double() @ weight64
    return relative_error(torch, first, ref), bool(torch.equal(first, second))


# ---------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------


def _common_reason(torch, module: str, bits: int) -> Optional[str]:
    if torch is None:
        return "torch not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (CPU run)"
    if getattr(torch.version, "hip", None):
        return "ROCm build of torch (this adapter is CUDA only)"
    if importlib.util.find_spec(module) is None:
        return f"python package '{module}' not importable (see .whl/README.txt)"
    if bits != 4:
        return f"this adapter feeds 4-bit GPTQ only (bits={bits})"
    return None


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


class HummingPeer:
    """humming, loaded the way vLLM's ``--quantization humming`` loads a GPTQ checkpoint (see the module docstring)."""

    key = "humming"
    label = LABELS["humming"]

    def __init__(self, torch, bits: int = 4, group_size: int = 128, act_order: bool = False, sym: bool = True,
                 ms: Sequence[int] = (), tuning: str = "per-m"):
        self.torch, self.bits, self.group_size, self.sym = torch, bits, group_size, sym
        self.ms, self.tuning = sorted(set(int(m) for m in ms)), tuning
        self.reason = _common_reason(torch, "humming", bits)
        if self.reason is None and act_order:
            self.reason = "humming's GPTQ schema asserts desc_act=False (schema/gptq.py to_humming_schema)"
        if self.reason is None and tuning not in ("per-m", "all"):
            self.reason = f"unknown tuning mode {tuning!r} (per-m or all)"
        if self.reason is None and tuning == "per-m" and not self.ms:
            self.reason = "tuning='per-m' needs the list of M values"
        self.compute_config = json.dumps({"use_batch_invariant": False, "use_f16_accum": False, "gemm_type": "dense"})
        self.version = None
        if self.reason is None:
            try:
                import humming  # noqa: F401
                from humming.layer import HummingMethod
                from humming.schema import BaseWeightSchema, HummingInputSchema
                from humming.tune import get_heuristics_config

                self.method, self.weight_schema_cls, self.input_schema_cls = HummingMethod, BaseWeightSchema, HummingInputSchema
                self.heuristics = get_heuristics_config
                self.version = getattr(humming, "__version__", None) or _version("humming-kernels")
            except Exception as error:  # a broken install must not cost the whole run
                self.reason = f"import humming failed: {type(error).__name__}: {error}"

    def settings(self) -> dict:
        return {"version": self.version, "sym": self.sym, "tuning": self.tuning, "compute_config": self.compute_config,
                "pad_n_to_multiple": 256, "pad_k_to_multiple": 128}

    def gptq_config(self) -> dict:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "sym": self.sym,
                "desc_act": False}

    def checkpoint_tensors(self, qweight, qzeros, scales, zeros_as_stored: bool = False) -> Dict[str, object]:
        """Our GPTQ v1 tensors -> the tensors humming's GPTQ schema reads (qzeros made v2 unless told otherwise)."""
        torch = self.torch
        if not self.sym and not zeros_as_stored:
            stored = unpack_cols(torch, qzeros, self.bits)
            if int(stored.max()) >= (1 << self.bits) - 1:
                raise ValueError("a v1 stored zero of 15 (z = 16) has no 4-bit form in humming's v2 reading")
            qzeros = pack_cols(torch, stored + 1, self.bits)
        k = qweight.shape[0] * 32 // self.bits
        g_idx = (torch.arange(k, device=qweight.device, dtype=torch.int32) // self.group_size).contiguous()
        return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(), "scales": scales.contiguous(),
                "g_idx": g_idx}

    def prepare(self, qweight, qzeros, scales, zeros_as_stored: bool = False):
        """A torch.nn.Module holding humming's transformed weight, as vLLM's HummingLinearMethod leaves a layer."""
        torch = self.torch
        k, n = qweight.shape[0] * 32 // self.bits, qweight.shape[1]
        tensors = self.checkpoint_tensors(qweight, qzeros, scales, zeros_as_stored)
        schema = self.weight_schema_cls.from_config(self.gptq_config())
        weight_schema, weight_tensors = schema.convert_humming(
            tensors=tensors, shape_n_stacks=[n], shape_k_stacks=[k], param_dtype=torch.float16)
        input_schema, _ = self.input_schema_cls().convert_humming(
            tensors={}, shape_n_stacks=[n], shape_k_stacks=[k], param_dtype=torch.float16)
        layer = torch.nn.Module()
        for name, tensor in weight_tensors.items():
            setattr(layer, name, torch.nn.Parameter(tensor, requires_grad=False))
        self.method.prepare_layer_meta(
            layer=layer, shape_n=n, shape_k=k, weight_schema=weight_schema, input_schema=input_schema,
            pad_n_to_multiple=256, pad_k_to_multiple=128, has_bias=False, torch_dtype=torch.float16)
        self.method.transform_humming_layer(layer)
        layer.register_buffer("locks", torch.zeros(8192, dtype=torch.int32, device=qweight.device))
        meta = self.method._get_meta(layer)  # as transform_humming_layer left it
        layer.tuning_config = self._tuning_config(meta) if self.tuning == "per-m" else None
        layer.shape_kn = (k, n)
        return layer

    def _config_for(self, meta, m: int) -> dict:
        return self.heuristics(meta, shape_m=m, use_f16_accum=False, use_batch_invariant=False, gemm_type="dense")

    def _tuning_config(self, meta) -> str:
        """[lo, hi, config] intervals holding only the configs of self.ms (the last open-ended)."""
        intervals, lo = [], 0
        for m in self.ms:
            config = self._config_for(meta, m)
            if intervals and intervals[-1][2] == config:
                intervals[-1][1] = m
            else:
                intervals.append([lo, m, config])
            lo = m
        intervals[-1][1] = 0  # the launcher reads hi <= 0 as "no upper bound"
        return json.dumps(intervals)

    def kernel(self, handle, m: int) -> str:
        """The heuristic kernel config for M rows, in short (what vLLM would launch for that M)."""
        try:
            c = self._config_for(self.method._get_meta(handle), m)
            shape = "x".join(str(x) for x in c.get("block_shape", ()))
            return (f"{c.get('mma_type')} {shape} stages={c.get('num_stages')} ctas/sm={c.get('num_ctas_per_sm')}"
                    f"{' stream-k' if c.get('use_stream_k') else ''}")
        except Exception as error:
            return f"? ({type(error).__name__})"

    def __call__(self, handle, a):
        return self.method.forward_layer(layer=handle, inputs=a, compute_config=self.compute_config,
                                         tuning_config=handle.tuning_config)


class GemlitePeer:
    """gemlite's A16W4 group-128 Triton kernels on GPTQ weights converted like gemlite's vLLM plugin does."""

    key = "gemlite"
    label = LABELS["gemlite"]

    def __init__(self, torch, bits: int = 4, group_size: int = 128, act_order: bool = False, sym: bool = True,
                 autotune: str = "fast"):
        self.torch, self.bits, self.group_size, self.sym, self.autotune = torch, bits, group_size, sym, autotune
        self.reason = _common_reason(torch, "gemlite", bits)
        if self.reason is None and act_order:
            self.reason = "act-order: this adapter does not reorder activations (gemlite's vLLM plugin does)"
        if self.reason is None and autotune not in ("fast", "default", "max"):
            self.reason = f"unknown gemlite autotune mode {autotune!r} (fast, default, max)"
        self.version = None
        if self.reason is None:
            try:
                import gemlite
                from gemlite.core import get_matmul_type
                from gemlite.helper import A16Wn

                if autotune != "fast":  # "fast" is gemlite's default: leave its modules as imported
                    gemlite.set_autotune(autotune)
                self.builder, self.matmul_type = A16Wn, get_matmul_type
                self.version = getattr(gemlite, "__version__", None) or _version("gemlite")
            except Exception as error:
                self.reason = f"import gemlite failed: {type(error).__name__}: {error}"

    def settings(self) -> dict:
        return {"version": self.version, "sym": self.sym, "autotune": self.autotune}

    def convert(self, qweight, qzeros, scales):
        """GPTQ v1 -> (W_q uint8 [N, K], scales fp16 [N, G], zeros fp16 [N, G]) with w = (q - zero) * scale."""
        torch = self.torch
        w_q = unpack_rows(torch, qweight, self.bits).t().contiguous().to(torch.uint8)
        zeros = (unpack_cols(torch, qzeros, self.bits) + 1).t().contiguous().to(scales.dtype)
        return w_q, scales.t().contiguous(), zeros

    def prepare(self, qweight, qzeros, scales):
        w_q, s, z = self.convert(qweight, qzeros, scales)
        return self.builder(device=qweight.device, dtype=self.torch.float16).from_weights(
            w_q, s, z, W_nbits=self.bits, group_size=self.group_size)

    def kernel(self, handle, m: int) -> str:
        try:
            return str(self.matmul_type(m, self.bits))
        except Exception as error:
            return f"? ({type(error).__name__})"

    def __call__(self, handle, a):
        return handle(a)


def make(torch, names: Sequence[str], *, bits: int, group_size: int, act_order: bool, sym: bool,
         ms: Sequence[int], humming_tuning: str = "per-m", gemlite_autotune: str = "fast") -> List[object]:
    """The requested peers, each with .reason set where it cannot run."""
    peers = []
    for name in names:
        if name == "humming":
            peers.append(HummingPeer(torch, bits, group_size, act_order, sym, ms, humming_tuning))
        elif name == "gemlite":
            peers.append(GemlitePeer(torch, bits, group_size, act_order, sym, gemlite_autotune))
        else:
            raise ValueError(f"unknown peer {name!r} (known: {', '.join(NAMES)})")
    return peers


def timed_first_call(torch, peer, handle, a) -> float:
    """Wall seconds of one call, synchronised: on a fresh shape this includes JIT compile / autotune."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    peer(handle, a)
    torch.cuda.synchronize()
    return time.perf_counter() - start
