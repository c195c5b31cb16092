"""End-to-end generation benchmark: the paper's six models, every variant, fp16.

Each model is a small self-written torch decoder with the real architecture,
true dimensions and layer count (RMSNorm, RoPE, GQA attention with a
preallocated KV cache, SiLU MLP; Qwen's qkv bias). Weights are random (seeded),
quantized to GPTQ 4-bit, group 128 (round-to-nearest, GPTQ v1 format, on the
device); every linear layer (qkv fused, o, gate+up fused, down) runs through
`opt4gptq.gptq_gemm(..., use_exllama=True, variant=...)` after `gptq_shuffle`,
as vLLM does; embeddings, norms, attention and the lm_head run in torch fp16.
Configs: every variant (the paper's ablation, exllama family), "default" (no
variant named: opt4gptq's own dispatch, its tensor-core kernel on CUDA builds),
and "fp16", the same model on its dequantized weights through torch.

Workload, like the paper's (vLLM's benchmark_throughput on ShareGPT): batches
of `--batch-size` prompts whose input/output lengths follow ShareGPT's
distribution (seeded synthetic sampler, or the real file with `--dataset`),
capped at `--max-input` / `--max-output`; static batched greedy decoding with
a KV cache: one packed prefill, then decode steps in which each request stops
at its own output length (finished requests leave the batch; the batch is
padded to 1, 2, 4, 8, then multiples of 8 rows, and every (rows, context
bucket) shape of the decode step is a captured CUDA graph on GPUs; eager on
the CPU). Reports output and total tokens/s and per-request latency, mean and
spread over `--repeats`, plus the accuracy stand-in (`--accuracy`): top-1
agreement of each variant with the fp16 model, teacher-forced.

Defaults are sized for about 5 minutes on one H100 for all six models
(estimated, not yet measured: one batch of 32 prompts, at most 512 input and
96 output tokens per request, 3 repeats of each of 7 configs); the paper used
15 repeats. `--quick` takes two models, 16 prompts, 32 output tokens, 2
repeats (under 2 minutes on an H100). Without a GPU build or GPU, the models
shrink to tiny shapes (2 layers) on the CPU backend, so the script still runs
everywhere (CI).

    python benchmarks/bench_e2e.py --out benchmarks/results/h100/e2e
    python benchmarks/bench_e2e.py --quick --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import opt4gptq
from opt4gptq import pack
from provenance import git_commit

# ---------------------------------------------------------------------------
# the six models
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # where the numbers come from
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool = False
    tie_embeddings: bool = False
    tiny: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def linear_shapes(self) -> List[Tuple[str, int, int]]:
        """(name, K, N) of the four linear layers of one decoder layer, as served."""
        return [("qkv", self.hidden, self.qkv_out), ("o", self.heads * self.head_dim, self.hidden),
                ("gate_up", self.hidden, 2 * self.intermediate), ("down", self.intermediate, self.hidden)]

    def param_count(self) -> int:
        per_layer = sum(k * n for _, k, n in self.linear_shapes()) + 2 * self.hidden
        per_layer += self.qkv_out if self.qkv_bias else 0
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden

    def shrunk(self) -> "ModelSpec":
        """Tiny shapes with the same architecture (GQA ratio, bias, rope) for the CPU backend."""
        heads, hidden = 4, 256
        kv = max(1, heads * self.kv_heads // self.heads)
        inter = max(128, int(round(self.intermediate / self.hidden * hidden / 128)) * 128)
        return replace(self, name=f"{self.name}", hidden=hidden, intermediate=inter, layers=2, heads=heads,
                       kv_heads=kv, vocab=1024, tiny=True)


# Numbers from each model's Hugging Face config.json (checked with the search
# tool against the published config.json files, e.g.
# huggingface.co/Qwen/Qwen1.5-4B-Chat/blob/4cd30db/config.json and copies of
# meta-llama/Llama-2-7b-hf, codellama/CodeLlama-7b-hf, meta-llama/Meta-Llama-3-8B,
# huggyllama/llama-13b and Qwen/Qwen1.5-1.8B (snapshot 7846de7) configs).
MODELS: Dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", "meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 10000.0, 1e-5),
    "codellama-7b": ModelSpec("codellama-7b", "codellama/CodeLlama-7b-hf", 4096, 11008, 32, 32, 32, 32016, 1e6, 1e-5),
    "llama3-8b": ModelSpec("llama3-8b", "meta-llama/Meta-Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 500000.0, 1e-5),
    "llama-13b": ModelSpec("llama-13b", "huggyllama/llama-13b (LLaMA-13B)", 5120, 13824, 40, 40, 40, 32000, 10000.0, 1e-6),
    "qwen1.5-4b": ModelSpec("qwen1.5-4b", "Qwen/Qwen1.5-4B", 2560, 6912, 40, 20, 20, 151936, 5e6, 1e-6, qkv_bias=True),
    "qwen1.5-1.8b": ModelSpec("qwen1.5-1.8b", "Qwen/Qwen1.5-1.8B", 2048, 5504, 24, 16, 16, 151936, 1e6, 1e-6, qkv_bias=True),
}
# Parameter counts the model cards give (a check on the dimensions above, to 1%).
EXPECTED_PARAMS = {"llama2-7b": 6.74e9, "codellama-7b": 6.74e9, "llama3-8b": 8.03e9, "llama-13b": 13.0e9,
                   "qwen1.5-4b": 3.95e9, "qwen1.5-1.8b": 1.84e9}
QUICK_MODELS = ["llama3-8b", "qwen1.5-1.8b"]  # GQA + big vocab, and Qwen's qkv bias

BITS = 4
GROUP_SIZE = 128
FP16 = "fp16"  # the config name of the unquantized model
DEFAULT = "default"  # GPTQ with no variant named: opt4gptq's own dispatch (what a vLLM user gets)

# ---------------------------------------------------------------------------
# GPTQ packing in torch (the fast twin of opt4gptq.pack.quantize, same rules)
# ---------------------------------------------------------------------------

_MIN_SCALE = 2.0 ** -24  # smallest positive float16, as pack.quantize


@dataclass
class GPTQTensors:
    qweight: torch.Tensor  # int32 [K*bits/32, N]
    qzeros: torch.Tensor  # int32 [G, N*bits/32]
    scales: torch.Tensor  # float16 [G, N]
    g_idx: torch.Tensor  # int32 [K]
    bits: int
    v2: bool = False


def _to_int32_words(x: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def _values_per_word(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"the torch packer handles 2, 4 and 8 bits (got {bits}); 3-bit goes through opt4gptq.pack")
    return 32 // bits


def pack_rows_torch(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] values -> int32 [K*bits/32, N], value k at bits [k*bits % 32, ...) of word k*bits // 32."""
    per = _values_per_word(bits)
    k, n = q.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=q.device).view(1, per, 1)
    return _to_int32_words((q.to(torch.int64).view(k // per, per, n) << shifts).sum(1))


def pack_cols_torch(z: torch.Tensor, bits: int) -> torch.Tensor:
    """[G, N] values -> int32 [G, N*bits/32], packed along N."""
    per = _values_per_word(bits)
    g, n = z.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=z.device)
    return _to_int32_words((z.to(torch.int64).view(g, n // per, per) << shifts).sum(-1))


def unpack_rows_torch(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    per = _values_per_word(bits)
    words, n = qweight.shape
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device).view(1, per, 1)
    return ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(words * per, n)


def unpack_cols_torch(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    _values_per_word(bits)  # checks bits
    g = qzeros.shape[0]
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qzeros.device)
    return ((qzeros.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(g, -1)[:, :n]


def _fp16_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest float16 >= scale (scale > 0, float64): pack.quantize's rounding of scales."""
    s16 = scale.to(torch.float16)
    low = s16.to(torch.float64) < scale
    bumped = (s16.view(torch.int16) + 1).view(torch.float16)  # next float16 up (positive, finite)
    s16 = torch.where(low, bumped, s16)
    if not torch.isfinite(s16).all():
        raise ValueError("a group's range is too large for float16 scales")
    return s16


def quantize_rtn(w: torch.Tensor, bits: int = BITS, group_size: int = GROUP_SIZE, v2: bool = False,
                 chunk: int = 4096) -> GPTQTensors:
    """Round-to-nearest GPTQ quantization of w [K, N] on w's device (no act-order).

    Same rules as opt4gptq.pack.quantize (min/max per group and column, range
    extended to 0, scale rounded up to float16, v1 zero >= 1), computed in
    float64 over column chunks, so the two agree bit for bit
    (tests/test_bench_e2e.py checks it).
    """
    k, n = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} must divide K={k}")
    groups, qmax = k // group_size, (1 << bits) - 1
    qweight, qzeros, scales = [], [], []
    per = 32 // math.gcd(bits, 32)
    chunk = max(per, chunk // per * per)
    for c0 in range(0, n, chunk):
        wc = w[:, c0:c0 + chunk].to(torch.float64)
        wg = wc.view(groups, group_size, -1)
        lo = wg.amin(1).clamp(max=0.0)
        hi = wg.amax(1).clamp(min=0.0)
        scale = _fp16_ceil(((hi - lo) / qmax).clamp(min=_MIN_SCALE))
        z = torch.round(-lo / scale.to(torch.float64)).clamp(0, qmax)
        if not v2:
            fix = z < 1
            alt = _fp16_ceil((hi / (qmax - 1)).clamp(min=_MIN_SCALE))
            scale = torch.where(fix, alt, scale)
            z = torch.where(fix, torch.ones_like(z), z)
        q = torch.round(wg / scale.to(torch.float64).unsqueeze(1)) + z.unsqueeze(1)
        q = q.clamp(0, qmax).to(torch.int64).view(k, -1)
        qweight.append(pack_rows_torch(q, bits))
        stored = z.to(torch.int64) - (0 if v2 else 1)
        qzeros.append(pack_cols_torch(stored, bits))
        scales.append(scale)
        del wc, wg, q
    g_idx = (torch.arange(k, device=w.device) // group_size).to(torch.int32)
    return GPTQTensors(torch.cat(qweight, 1), torch.cat(qzeros, 1), torch.cat(scales, 1), g_idx, bits, v2)


def dequantize_torch(t: GPTQTensors, chunk: int = 8192) -> torch.Tensor:
    """float16 [K, N] = scales[g] * (q - z[g]) (z = stored + 1 in v1), rounded once to fp16."""
    n = t.scales.shape[1]
    g_idx = t.g_idx.to(torch.int64)
    if t.bits == 3:  # no torch unpacker for the 3-bit stream: the numpy reference
        w = pack.dequantize(t.qweight.cpu().numpy(), t.qzeros.cpu().numpy(), t.scales.cpu().numpy(),
                            t.g_idx.cpu().numpy(), 3, v2=t.v2)
        return torch.from_numpy(w).to(torch.float16).to(t.scales.device)
    per = 32 // t.bits
    out = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        q = unpack_rows_torch(t.qweight[:, c0:c1], t.bits)
        z = unpack_cols_torch(t.qzeros[:, c0 // per:(c1 + per - 1) // per], t.bits, c1 - c0) + (0 if t.v2 else 1)
        s = t.scales[:, c0:c1].float()
        out.append((s[g_idx] * (q - z[g_idx]).float()).to(torch.float16))
    return torch.cat(out, 1)


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------


@dataclass
class QLinear:
    """One linear layer as opt4gptq serves it: shuffled qweight, and the permutation vLLM passes."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    perm: torch.Tensor  # int32 argsort(g_idx) for act-order, else empty
    bits: int
    v2: bool
    bias: Optional[torch.Tensor] = None


@dataclass
class DLinear:
    """The same layer as a torch fp16 linear: weight [N, K] (dequantized), as nn.Linear keeps it."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


@dataclass
class Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: object
    o: object
    gate_up: object
    down: object


@dataclass
class Weights:
    embed: torch.Tensor  # [V, hidden] fp16
    layers: List[Layer]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [V, hidden] fp16


def serve(t: GPTQTensors, bias: Optional[torch.Tensor]) -> Tuple[QLinear, DLinear]:
    """Dequantize (the fp16 twin), then shuffle as vLLM 0.3.3's GPTQ layer does."""
    k = t.g_idx.numel()
    groups = t.scales.shape[0]
    trivial = torch.equal(t.g_idx.to(torch.int64), torch.arange(k, device=t.g_idx.device) // max(1, k // groups))
    dense = DLinear(dequantize_torch(t).t().contiguous(), bias)
    if trivial:
        perm = torch.empty(0, dtype=torch.int32, device=t.qweight.device)
    else:
        perm = torch.argsort(t.g_idx.to(torch.int64), stable=True).to(torch.int32)
    qweight = t.qweight.contiguous()
    opt4gptq.gptq_shuffle(qweight, perm, t.bits)
    return QLinear(qweight, t.qzeros.contiguous(), t.scales.contiguous(), perm, t.bits, t.v2, bias), dense


def random_weights(spec: ModelSpec, device: str, seed: int, logit_std: float) -> Tuple[Weights, Weights]:
    """Random weights (seeded), quantized; returns (GPTQ model, its dequantized fp16 twin).

    Scales, chosen so the model behaves like a trained one where the benchmark
    looks: embeddings N(0, 1); the inputs of q/k/v and gate/up see unit-RMS
    activations (RMSNorm), so their weights are N(0, 1/K) and their outputs
    have unit variance (attention scores ~N(0, 1)); o and down are further
    divided by sqrt(2 * layers), so each residual branch adds a small part and
    the hidden state stays a smooth function of the input (not chaotic); the
    lm_head is N(0, logit_std^2 / hidden), so after the final RMSNorm the
    logits have a standard deviation of about `logit_std` (5: a top-1 margin of
    the order of 1, like a trained LM, not the near-ties of a flat 0.02 init).
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std

    branch = 1.0 / math.sqrt(2 * spec.layers)
    quant_layers, dense_layers = [], []
    for _ in range(spec.layers):
        ln1 = torch.ones(spec.hidden, dtype=torch.float16, device=device)
        ln2 = torch.ones(spec.hidden, dtype=torch.float16, device=device)
        made = {}
        for name, k, n in spec.linear_shapes():
            std = 1.0 / math.sqrt(k) * (branch if name in ("o", "down") else 1.0)
            w = randn(k, n, std=std)
            t = quantize_rtn(w)
            del w
            bias = randn(n, std=0.1).to(torch.float16) if (name == "qkv" and spec.qkv_bias) else None
            made[name] = serve(t, bias)
        quant_layers.append(Layer(ln1, ln2, *(made[name][0] for name in ("qkv", "o", "gate_up", "down"))))
        dense_layers.append(Layer(ln1, ln2, *(made[name][1] for name in ("qkv", "o", "gate_up", "down"))))
    embed = randn(spec.vocab, spec.hidden).to(torch.float16)
    lm_head = embed if spec.tie_embeddings else randn(spec.vocab, spec.hidden, std=logit_std / math.sqrt(spec.hidden)).to(torch.float16)
    norm = torch.ones(spec.hidden, dtype=torch.float16, device=device)
    return Weights(embed, quant_layers, norm, lm_head), Weights(embed, dense_layers, norm, lm_head)


# ---------------------------------------------------------------------------
# safetensors (a small reader/writer, so no extra package is needed)
# ---------------------------------------------------------------------------

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_index(path: str) -> Dict[str, tuple]:
    """name -> (file, dtype, shape, begin, end) for every tensor of one .safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    base = 8 + size
    return {name: (path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0],
                   base + info["data_offsets"][1])
            for name, info in header.items() if name != "__metadata__"}


def load_tensor(entry: tuple, device: str) -> torch.Tensor:
    path, dtype, shape, begin, end = entry
    with open(path, "rb") as f:
        f.seek(begin)
        data = bytearray(f.read(end - begin))
    t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    return t.reshape(shape).to(device)


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


# ---------------------------------------------------------------------------
# real GPTQ checkpoints (--model PATH)
# ---------------------------------------------------------------------------


def load_checkpoint(path: str, device: str) -> Tuple[ModelSpec, Weights, Weights]:
    """A GPTQ checkpoint directory (config.json + *.safetensors with qweight/qzeros/scales/g_idx).

    Llama-family and Qwen2 layouts (model.layers.N.self_attn.{q,k,v,o}_proj,
    mlp.{gate,up,down}_proj); q/k/v and gate/up are fused along N as vLLM does
    (their g_idx must agree). Act-order (desc_act) layers are shuffled with
    argsort(g_idx); gptq_v2 checkpoints use use_v2_format. The fp16 twin is the
    dequantized checkpoint.
    """
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    qcfg = cfg.get("quantization_config")
    if qcfg is None and os.path.exists(os.path.join(path, "quantize_config.json")):
        with open(os.path.join(path, "quantize_config.json")) as f:
            qcfg = json.load(f)
    if not qcfg or str(qcfg.get("quant_method", "gptq")).lower() != "gptq":
        raise ValueError(f"{path}: not a GPTQ checkpoint (quantization_config: {qcfg})")
    bits = int(qcfg.get("bits", 4))
    v2 = str(qcfg.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"{path}: model_type {model_type!r} is not a Llama/Qwen2 decoder")
    heads = cfg["num_attention_heads"]
    spec = ModelSpec(
        name=os.path.basename(os.path.normpath(path)), source=path, hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
        kv_heads=cfg.get("num_key_value_heads", heads), vocab=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)), rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    if cfg.get("head_dim", spec.head_dim) != spec.head_dim:
        raise ValueError(f"{path}: head_dim {cfg['head_dim']} != hidden/heads; not supported")
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files")
    index: Dict[str, tuple] = {}
    for file in files:
        index.update(read_safetensors_index(file))

    def get(name: str, required: bool = True) -> Optional[torch.Tensor]:
        if name not in index:
            if required:
                raise KeyError(f"{path}: tensor {name} missing")
            return None
        return load_tensor(index[name], device)

    def gptq(prefix: str) -> Tuple[GPTQTensors, Optional[torch.Tensor]]:
        qweight = get(prefix + ".qweight")
        k = qweight.shape[0] * 32 // bits
        g_idx = get(prefix + ".g_idx", required=False)
        scales = get(prefix + ".scales").to(torch.float16)
        if g_idx is None:
            g_idx = torch.arange(k, device=device) // (k // scales.shape[0])
        bias = get(prefix + ".bias", required=False)
        if bias is not None and not bias.any():
            bias = None
        return GPTQTensors(qweight, get(prefix + ".qzeros"), scales, g_idx.to(torch.int32), bits, v2), bias

    def fused(prefixes: Sequence[str]) -> Tuple[QLinear, DLinear]:
        parts = [gptq(p) for p in prefixes]
        first = parts[0][0]
        for (t, _), p in zip(parts[1:], prefixes[1:]):
            if not torch.equal(t.g_idx, first.g_idx):
                raise ValueError(f"{p}: g_idx differs from {prefixes[0]}; cannot fuse (vLLM cannot either)")
        t = GPTQTensors(torch.cat([t.qweight for t, _ in parts], 1), torch.cat([t.qzeros for t, _ in parts], 1),
                        torch.cat([t.scales for t, _ in parts], 1), first.g_idx, bits, v2)
        biases = [b if b is not None else torch.zeros(pt.scales.shape[1], device=device) for pt, b in parts]
        bias = torch.cat(biases).to(torch.float16) if any(b is not None for _, b in parts) else None
        return serve(t, bias)

    quant_layers, dense_layers = [], []
    for i in range(spec.layers):
        pre = f"model.layers.{i}"
        ln1 = get(pre + ".input_layernorm.weight").to(torch.float16)
        ln2 = get(pre + ".post_attention_layernorm.weight").to(torch.float16)
        made = [fused([f"{pre}.self_attn.{x}_proj" for x in "qkv"]), fused([pre + ".self_attn.o_proj"]),
                fused([f"{pre}.mlp.{x}_proj" for x in ("gate", "up")]), fused([pre + ".mlp.down_proj"])]
        quant_layers.append(Layer(ln1, ln2, *(m[0] for m in made)))
        dense_layers.append(Layer(ln1, ln2, *(m[1] for m in made)))
    embed = get("model.embed_tokens.weight").to(torch.float16)
    lm_head = get("lm_head.weight", required=not spec.tie_embeddings)
    lm_head = embed if lm_head is None else lm_head.to(torch.float16)
    norm = get("model.norm.weight").to(torch.float16)
    return spec, Weights(embed, quant_layers, norm, lm_head), Weights(embed, dense_layers, norm, lm_head)


def write_synthetic_checkpoint(path: str, spec: ModelSpec, seed: int = 0, act_order: bool = False,
                               bits: int = BITS, group_size: int = GROUP_SIZE) -> None:
    """A tiny GPTQ checkpoint in the Hugging Face layout (for tests of --model): config.json,
    model.safetensors with per-projection qweight/qzeros/scales/g_idx from opt4gptq.pack.quantize."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors: Dict[str, torch.Tensor] = {}

    def put(prefix: str, k: int, n: int, perm_seed: int, bias: bool = False):
        w = rng.standard_normal((k, n)) / math.sqrt(k)
        t = pack.quantize(w, bits, group_size, act_order=act_order, rng=perm_seed)  # same seed -> same g_idx
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{prefix}.{key}"] = torch.from_numpy(np.ascontiguousarray(getattr(t, key)))
        if bias:
            tensors[prefix + ".bias"] = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float16))

    d = spec.head_dim
    for i in range(spec.layers):
        pre = f"model.layers.{i}"
        for x, n in (("q", spec.heads * d), ("k", spec.kv_heads * d), ("v", spec.kv_heads * d)):
            put(f"{pre}.self_attn.{x}_proj", spec.hidden, n, perm_seed=1000 + i, bias=spec.qkv_bias)
        put(f"{pre}.self_attn.o_proj", spec.heads * d, spec.hidden, perm_seed=2000 + i)
        for x in ("gate", "up"):
            put(f"{pre}.mlp.{x}_proj", spec.hidden, spec.intermediate, perm_seed=3000 + i)
        put(f"{pre}.mlp.down_proj", spec.intermediate, spec.hidden, perm_seed=4000 + i)
        tensors[pre + ".input_layernorm.weight"] = torch.ones(spec.hidden, dtype=torch.float16)
        tensors[pre + ".post_attention_layernorm.weight"] = torch.ones(spec.hidden, dtype=torch.float16)
    tensors["model.embed_tokens.weight"] = torch.from_numpy(rng.standard_normal((spec.vocab, spec.hidden)).astype(np.float16))
    tensors["model.norm.weight"] = torch.ones(spec.hidden, dtype=torch.float16)
    head = rng.standard_normal((spec.vocab, spec.hidden)) * 5 / math.sqrt(spec.hidden)
    tensors["lm_head.weight"] = torch.from_numpy(head.astype(np.float16))
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    config = {"architectures": ["Qwen2ForCausalLM" if spec.qkv_bias else "LlamaForCausalLM"],
              "model_type": "qwen2" if spec.qkv_bias else "llama", "hidden_size": spec.hidden,
              "intermediate_size": spec.intermediate, "num_hidden_layers": spec.layers,
              "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads, "vocab_size": spec.vocab,
              "rope_theta": spec.rope_theta, "rms_norm_eps": spec.rms_eps, "tie_word_embeddings": False,
              "torch_dtype": "float16",
              "quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                      "desc_act": act_order, "sym": False}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


# ---------------------------------------------------------------------------
# workload
# ---------------------------------------------------------------------------

# ShareGPT lengths. vLLM's paper (Kwon et al., SOSP'23, Fig. 11) gives ShareGPT
# means of 161 input and 338 output tokens, both long-tailed. The sampler draws
# log-normal lengths with those means (sigma 1.0 for inputs, 0.9 for outputs:
# medians ~98 and ~225, long right tails, our choice of shape), then applies
# vLLM benchmark_throughput's own filter (input and output >= 4 tokens, input
# <= 1024, input + output <= 2048), then our caps (--max-input/--max-output)
# that keep the run short. Log-normal because chat turn lengths are
# multiplicative-noise quantities with a heavy tail, and it needs only the
# published means. After the filter the sampled means are about 146 and 312.
SHAREGPT_MEAN_INPUT, SHAREGPT_SIGMA_INPUT = 161.0, 1.0
SHAREGPT_MEAN_OUTPUT, SHAREGPT_SIGMA_OUTPUT = 338.0, 0.9


def _vllm_filter(prompt: int, output: int) -> bool:
    return prompt >= 4 and output >= 4 and prompt <= 1024 and prompt + output <= 2048


def synthetic_lengths(n: int, seed: int) -> List[Tuple[int, int]]:
    rng = np.random.default_rng(seed)
    mu_in = math.log(SHAREGPT_MEAN_INPUT) - SHAREGPT_SIGMA_INPUT ** 2 / 2
    mu_out = math.log(SHAREGPT_MEAN_OUTPUT) - SHAREGPT_SIGMA_OUTPUT ** 2 / 2
    pairs: List[Tuple[int, int]] = []
    while len(pairs) < n:
        p = int(round(rng.lognormal(mu_in, SHAREGPT_SIGMA_INPUT)))
        o = int(round(rng.lognormal(mu_out, SHAREGPT_SIGMA_OUTPUT)))
        if _vllm_filter(p, o):
            pairs.append((p, o))
    return pairs


def approx_tokens(text: str) -> int:
    """Token count without a tokenizer: ~4 ASCII characters per token (the usual rule for
    English with BPE/SentencePiece vocabularies), one token per non-ASCII character
    (Llama's SentencePiece emits at least one per CJK character)."""
    ascii_chars = sum(1 for c in text if ord(c) < 128)
    return max(1, int(round(ascii_chars / 4 + (len(text) - ascii_chars))))


def dataset_lengths(path: str, n: int, seed: int) -> List[Tuple[int, int]]:
    """Lengths of the first human turn and the reply of ShareGPT conversations, as
    benchmark_throughput samples them (shuffled with the seed, same filter)."""
    with open(path) as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    order = np.random.default_rng(seed).permutation(len(convs))
    pairs = []
    for i in order:
        p, o = approx_tokens(convs[i][0]["value"]), approx_tokens(convs[i][1]["value"])
        if _vllm_filter(p, o):
            pairs.append((p, o))
            if len(pairs) == n:
                break
    if len(pairs) < n:
        raise ValueError(f"{path}: only {len(pairs)} usable conversations, {n} asked for")
    return pairs


def pad_rows(n: int, cap: int) -> int:
    """Rows a decode step of n requests runs with: 1, 2, 4, 8, then multiples of 8 (as vLLM's graphs)."""
    for p in (1, 2, 4, 8):
        if n <= p:
            return min(p, cap)
    return min(-(-n // 8) * 8, cap)


@dataclass
class Step:
    s: int  # decode step (token index produced), 1-based
    n: int  # live requests
    rows: int  # padded rows
    ctx: int  # attention length bucket
    holes: Optional[torch.Tensor] = None  # rows freed by finished requests, refilled from `movers`
    movers: Optional[torch.Tensor] = None
    reset_from: Optional[int] = None  # rows >= this are padding after this step's compaction
    finished: List[int] = field(default_factory=list)


def plan_decode(prompt_lens: Sequence[int], out_lens: Sequence[int], bucket: int, cap: int, ctx_max: int) -> List[dict]:
    """The decode schedule of one static batch, known in advance (outputs have fixed lengths,
    as benchmark_throughput's ignore_eos): which requests live at each step, where finished
    requests' rows are refilled from the end (swap-remove), the padded rows and context bucket."""
    rows = list(range(len(prompt_lens)))  # rows[i] = request in row i
    plan = []
    for s in range(1, max(out_lens)):
        done = [r for r in rows if out_lens[r] == s]
        holes, movers, reset = [], [], None
        if done:
            keep = len(rows) - len(done)
            holes = [i for i in range(keep) if out_lens[rows[i]] == s]
            movers = [i for i in range(keep, len(rows)) if out_lens[rows[i]] != s]
            for h, m in zip(holes, movers):
                rows[h] = rows[m]
            rows = rows[:keep]
            reset = keep
        if not rows:
            break
        ctx = min(ctx_max, -(-max(prompt_lens[r] + s for r in rows) // bucket) * bucket)
        plan.append(dict(s=s, n=len(rows), rows=pad_rows(len(rows), cap), ctx=ctx, holes=holes, movers=movers,
                         reset_from=reset, finished=done, live=list(rows)))
    return plan


@dataclass
class Batch:
    prompt_lens: List[int]
    out_lens: List[int]
    tokens: torch.Tensor  # packed prompt tokens [T]
    positions: torch.Tensor  # [T]
    last: torch.Tensor  # index of each prompt's last token in the packed sequence
    prompt_lens_t: torch.Tensor
    steps: List[Step]

    @property
    def size(self) -> int:
        return len(self.prompt_lens)

    def keys(self) -> set:
        return {(st.rows, st.ctx) for st in self.steps}


def make_batch(pairs: Sequence[Tuple[int, int]], vocab: int, seed: int, device: str, bucket: int, cap: int,
               ctx_max: int) -> Batch:
    rng = np.random.default_rng(seed)
    prompt_lens = [p for p, _ in pairs]
    out_lens = [o for _, o in pairs]
    tokens = torch.from_numpy(rng.integers(0, vocab, size=sum(prompt_lens))).to(device)
    positions = torch.cat([torch.arange(p) for p in prompt_lens]).to(device)
    last = torch.tensor(np.cumsum(prompt_lens) - 1, device=device)
    steps = []
    for d in plan_decode(prompt_lens, out_lens, bucket, cap, ctx_max):
        st = Step(d["s"], d["n"], d["rows"], d["ctx"], reset_from=d["reset_from"], finished=d["finished"])
        if d["holes"]:
            st.holes = torch.tensor(d["holes"], device=device)
            st.movers = torch.tensor(d["movers"], device=device)
        steps.append(st)
    return Batch(prompt_lens, out_lens, tokens, positions, last, torch.tensor(prompt_lens, device=device), steps)


# ---------------------------------------------------------------------------
# the decoder
# ---------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form (Llama/Qwen2 in the Hugging Face layout). x [T, heads, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, H, L, D], k/v [1, KVH, L, D] -> [1, H, L, D] (SDPA; GQA natively where torch has it)."""
    if q.shape[1] != k.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:  # torch < 2.5
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Timer:
    """Seconds from start() to each mark(), with CUDA events on GPUs (no syncs in between)."""

    def __init__(self, device: str):
        self.cuda = device != "cpu"
        self.marks: list = []

    def start(self):
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def finish(self) -> List[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [self.t0.elapsed_time(ev) / 1e3 for ev in self.marks]
        return [t - self.t0 for t in self.marks]


class Engine:
    """A static-batch generator for one model shape: KV cache, static decode buffers, graphs."""

    def __init__(self, spec: ModelSpec, rows: int, ctx_max: int, max_out: int, device: str,
                 exllama_max_rows: Optional[int] = None):
        self.spec, self.rows, self.ctx_max, self.device = spec, rows, ctx_max, device
        self.exllama_max_rows = exllama_max_rows if device != "cpu" else None
        d, kvh = spec.head_dim, spec.kv_heads
        shape = (spec.layers, rows, kvh, ctx_max, d)
        self.kc = torch.zeros(shape, dtype=torch.float16, device=device)
        self.vc = torch.zeros(shape, dtype=torch.float16, device=device)
        self.tok = torch.zeros(rows, dtype=torch.int64, device=device)
        self.pos = torch.zeros(rows, dtype=torch.int64, device=device)
        self.req = torch.full((rows,), rows, dtype=torch.int64, device=device)  # row -> request (rows = padding)
        self.row_ids = torch.arange(rows, device=device)
        self.key_ids = torch.arange(ctx_max, device=device)
        self.step_t = torch.ones(1, dtype=torch.int64, device=device)
        self.out_tokens = torch.zeros(rows + 1, max_out + 1, dtype=torch.int64, device=device)
        inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        freqs = torch.outer(torch.arange(ctx_max, dtype=torch.float64), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(torch.float32).to(device)
        self.sin = emb.sin().to(torch.float32).to(device)
        # CPU fp16 matmul is a slow path in torch; the tiny CPU runs do attention products in fp32.
        self.attn_dtype = torch.float16 if device != "cpu" else torch.float32
        self.weights: Optional[Weights] = None
        self.config: str = FP16

    @property
    def variant(self) -> Optional[str]:
        """The variant= passed to gptq_gemm: None for the default dispatch."""
        return None if self.config in (FP16, DEFAULT) else self.config

    def use(self, weights: Weights, config: str) -> None:
        """config: FP16 (dense weights), DEFAULT (GPTQ, no variant named) or a variant name."""
        self.weights, self.config = weights, config

    # -- one linear layer ------------------------------------------------------
    def linear(self, x: torch.Tensor, lin) -> torch.Tensor:
        if isinstance(lin, DLinear):
            return F.linear(x, lin.weight, lin.bias)
        forced = self.exllama_max_rows and self.variant is not None and x.shape[0] <= self.exllama_max_rows
        path = "exllama" if forced else None
        y = opt4gptq.gptq_gemm(x, lin.qweight, lin.qzeros, lin.scales, lin.perm, True, lin.bits, lin.v2,
                               path=path, variant=self.variant)
        if lin.bias is not None:
            y += lin.bias
        return y

    def _split_qkv(self, qkv: torch.Tensor):
        s = self.spec
        d = s.head_dim
        q = qkv[:, :s.heads * d].view(-1, s.heads, d)
        k = qkv[:, s.heads * d:(s.heads + s.kv_heads) * d].view(-1, s.kv_heads, d)
        v = qkv[:, (s.heads + s.kv_heads) * d:].view(-1, s.kv_heads, d)
        return q, k, v

    def _mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        h = rms_norm(x, layer.ln2, self.spec.rms_eps)
        gu = self.linear(h, layer.gate_up)
        inter = self.spec.intermediate
        return self.linear(F.silu(gu[:, :inter]) * gu[:, inter:], layer.down)

    # -- prefill: all prompts packed for the linears, attention per prompt ----
    def prefill(self, batch: Batch) -> torch.Tensor:
        s, w = self.spec, self.weights
        x = w.embed[batch.tokens]
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin[batch.positions].unsqueeze(1)
        for li, layer in enumerate(w.layers):
            h = rms_norm(x, layer.ln1, s.rms_eps)
            q, k, v = self._split_qkv(self.linear(h, layer.qkv))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            attn = torch.empty_like(q)
            start = 0
            for r, length in enumerate(batch.prompt_lens):
                ks, vs = k[start:start + length].transpose(0, 1), v[start:start + length].transpose(0, 1)
                self.kc[li, r, :, :length] = ks
                self.vc[li, r, :, :length] = vs
                out = causal_attention(q[start:start + length].transpose(0, 1)[None], ks[None], vs[None])
                attn[start:start + length] = out[0].transpose(0, 1)
                start += length
            x = x + self.linear(attn.view(x.shape[0], -1), layer.o)
            x = x + self._mlp(x, layer)
        return F.linear(rms_norm(x[batch.last], w.norm, s.rms_eps), w.lm_head)

    # -- one decode step over `rows` rows, attention over `ctx` keys ----------
    def decode_step(self, rows: int, ctx: int) -> torch.Tensor:
        """Reads tok/pos of the first `rows` rows, writes their K/V, advances tok/pos and records
        the new tokens in out_tokens (no host sync: graph-capturable). Returns the logits."""
        s, w = self.spec, self.weights
        d, group = s.head_dim, s.heads // s.kv_heads
        tok, pos, row_ids = self.tok[:rows], self.pos[:rows], self.row_ids[:rows]
        x = w.embed[tok]
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        visible = self.key_ids[:ctx].unsqueeze(0) <= pos.unsqueeze(1)
        mask = torch.zeros(rows, ctx, dtype=torch.float32, device=x.device).masked_fill(~visible, float("-inf"))
        mask = mask.view(rows, 1, 1, ctx)
        scale = 1.0 / math.sqrt(d)
        for li, layer in enumerate(w.layers):
            h = rms_norm(x, layer.ln1, s.rms_eps)
            q, k, v = self._split_qkv(self.linear(h, layer.qkv))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            kc, vc = self.kc[li], self.vc[li]
            kc[row_ids, :, pos] = k
            vc[row_ids, :, pos] = v
            keys, values = kc[:rows, :, :ctx], vc[:rows, :, :ctx]  # [rows, KVH, ctx, D], no copy
            adt = self.attn_dtype
            scores = torch.matmul(q.view(rows, s.kv_heads, group, d).to(adt), keys.transpose(-1, -2).to(adt))
            probs = torch.softmax(scores.float() * scale + mask, dim=-1).to(adt)
            attn = torch.matmul(probs, values.to(adt)).to(torch.float16).reshape(rows, s.heads * d)
            x = x + self.linear(attn, layer.o)
            x = x + self._mlp(x, layer)
        logits = F.linear(rms_norm(x, w.norm, s.rms_eps), w.lm_head)
        nxt = logits.argmax(-1)
        self.out_tokens[self.req[:rows], self.step_t.expand(rows)] = nxt
        self.step_t += 1
        self.tok[:rows] = nxt
        self.pos[:rows] += 1
        return logits

    def reset_state(self) -> None:
        self.tok.zero_()
        self.pos.zero_()
        self.req.fill_(self.rows)
        self.step_t.fill_(1)

    def capture(self, keys: set) -> Tuple[Dict[tuple, object], Dict[str, str]]:
        """CUDA graphs of the decode step for every (rows, ctx) key; the kernels each row count used."""
        kernels: Dict[str, str] = {}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the graph: lazy init, first-use checks
            for key in sorted(keys):
                self.reset_state()
                self.decode_step(*key)
                if self.config != FP16:
                    kernels[f"M={key[0]}"] = opt4gptq.last_kernel()
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        graphs = {}
        for key in sorted(keys, reverse=True):  # largest first, one shared pool (as vLLM)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.decode_step(*key)
            graphs[key] = graph
        torch.cuda.synchronize()
        return graphs, kernels

    def generate(self, batch: Batch, graphs: Optional[dict] = None, teacher: Optional[torch.Tensor] = None,
                 record_logits: bool = False) -> dict:
        """Prefill + decode of one batch. teacher: [rows+1, >= max_out] tokens to feed instead of
        the model's own (teacher forcing). Returns seconds, per-request latencies, tokens, logits."""
        b = batch.size
        self.reset_state()
        self.req[:b] = self.row_ids[:b]
        timer = Timer(self.device)
        timer.start()
        logits = self.prefill(batch)
        first = logits.argmax(-1)
        self.out_tokens[:b, 0] = first
        self.tok[:b] = first if teacher is None else teacher[:b, 0]
        self.pos[:b] = batch.prompt_lens_t
        timer.mark()
        step_logits = []
        for st in batch.steps:
            if st.holes is not None:
                for buf in (self.tok, self.pos, self.req):
                    buf[st.holes] = buf[st.movers]
                for li in range(self.spec.layers):  # only the finished rows' slots are rewritten
                    self.kc[li, st.holes, :, :st.ctx] = self.kc[li, st.movers, :, :st.ctx]
                    self.vc[li, st.holes, :, :st.ctx] = self.vc[li, st.movers, :, :st.ctx]
            if st.reset_from is not None:
                self.pos[st.reset_from:] = 0
                self.req[st.reset_from:] = self.rows
            if teacher is not None:
                self.tok[:st.n] = teacher[self.req[:st.n], st.s - 1]
            if graphs is not None:
                graphs[(st.rows, st.ctx)].replay()
            else:
                out = self.decode_step(st.rows, st.ctx)
                if record_logits:
                    step_logits.append(out[:st.n].float())
            timer.mark()
        times = timer.finish()
        out_tokens = self.out_tokens[:b, :max(batch.out_lens)].clone()
        return {"seconds": times[-1], "latencies": [times[o - 1] for o in batch.out_lens],
                "tokens": out_tokens, "logits": step_logits}


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------


def spread(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def run_config(engine: Engine, batches: List[Batch], repeats: int, use_graphs: bool, progress, label: str) -> dict:
    keys = set().union(*(b.keys() for b in batches))
    graphs, kernels, capture_s = None, {}, 0.0
    if use_graphs:
        start = time.perf_counter()
        graphs, kernels = engine.capture(keys)
        for batch in batches:  # the prefill is eager: its first-use costs stay out of the timing too
            engine.reset_state()
            engine.prefill(batch)
        torch.cuda.synchronize()
        capture_s = time.perf_counter() - start
    else:  # eager: one warm-up batch, so first-call costs stay out of the timing
        engine.generate(batches[0])
        if engine.config != FP16:
            kernels["last"] = opt4gptq.last_kernel()
    progress.step(f"{label}: {'graphs captured' if use_graphs else 'warmed up'}")
    runs, last_tokens = [], None
    for rep in range(repeats):
        seconds, latencies, out_tok, in_tok, tokens = 0.0, [], 0, 0, []
        for batch in batches:
            result = engine.generate(batch, graphs=graphs)
            seconds += result["seconds"]
            latencies += result["latencies"]
            out_tok += sum(batch.out_lens)
            in_tok += sum(batch.prompt_lens)
            tokens.append(result["tokens"])
        last_tokens = tokens
        lat = sorted(latencies)
        runs.append({"seconds": seconds, "output_tokens": out_tok, "total_tokens": out_tok + in_tok,
                     "output_tok_s": out_tok / seconds, "total_tok_s": (out_tok + in_tok) / seconds,
                     "latency_mean_s": statistics.fmean(lat), "latency_p50_s": lat[len(lat) // 2],
                     "latency_p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "latency_max_s": lat[-1]})
        progress.step(f"{label}: run {rep + 1}/{repeats} {out_tok / seconds:9.1f} out tok/s")
    result = {"runs": runs, "graphs": len(graphs) if graphs else 0, "capture_s": capture_s, "kernels": kernels}
    for key in ("output_tok_s", "total_tok_s", "latency_mean_s", "latency_p90_s"):
        result[key] = spread([r[key] for r in runs])
    del graphs
    if engine.device != "cpu":
        torch.cuda.empty_cache()
    return result, last_tokens


def graph_check(engine: Engine, batches: List[Batch], graph_tokens: List[torch.Tensor]) -> dict:
    """The same batches eagerly: tokens must equal the graph run's (same kernels, same shapes)."""
    equal = total = 0
    for batch, tokens in zip(batches, graph_tokens):
        eager = engine.generate(batch)["tokens"]
        for r, o in enumerate(batch.out_lens):
            equal += int((eager[r, :o] == tokens[r, :o]).sum())
            total += o
    return {"tokens_equal_fraction": equal / total, "tokens": total}


def accuracy(engine: Engine, quant: Weights, dense: Weights, variants: List[str], batch: Batch, progress) -> dict:
    """Teacher-forced top-1 agreement of each variant with the fp16 model (its dequantized
    weights through torch), over the decode positions of `batch` (few rows, so the
    variant's own exllama kernel serves every linear layer on GPUs)."""
    engine.use(dense, FP16)
    ref = engine.generate(batch, record_logits=True)
    teacher = torch.zeros_like(engine.out_tokens)
    teacher[:batch.size, :ref["tokens"].shape[1]] = ref["tokens"]
    ref_logits = torch.cat(ref["logits"])
    top2 = ref_logits.topk(2, dim=-1).values
    probs = torch.softmax(ref_logits, -1)
    stats = {"logit_std": float(ref_logits.std(-1).mean()), "top1_prob_mean": float(probs.max(-1).values.mean()),
             "top1_margin_mean": float((top2[:, 0] - top2[:, 1]).mean()),
             "top1_margin_median": float((top2[:, 0] - top2[:, 1]).median())}
    del probs
    per_variant = {}
    for v in variants:
        engine.use(quant, v)
        got = torch.cat(engine.generate(batch, teacher=teacher, record_logits=True)["logits"])
        agree = float((got.argmax(-1) == ref_logits.argmax(-1)).float().mean())
        per_variant[v] = {"top1_agreement": agree, "max_logit_diff": float((got - ref_logits).abs().max()),
                          "positions": int(got.shape[0]), "kernel": opt4gptq.last_kernel()}
        progress.log(f"  accuracy {v:9s} top-1 agreement {agree * 100:6.2f}%  max |logit diff| "
                     f"{per_variant[v]['max_logit_diff']:.4f}  ({per_variant[v]['kernel']})")
    progress.step("accuracy")
    return {"reference": FP16, "prompts": batch.size, "decode_steps": len(batch.steps),
            "positions": int(ref_logits.shape[0]), "logit_stats": stats, "variants": per_variant,
            "max_logit_diff": max((p["max_logit_diff"] for p in per_variant.values()), default=0.0),
            "min_top1_agreement": min((p["top1_agreement"] for p in per_variant.values()), default=1.0)}


def crosscheck(spec: ModelSpec) -> dict:
    """Parameter count against the model card, and against transformers' own model where installed."""
    out = {"param_count": spec.param_count()}
    expected = EXPECTED_PARAMS.get(spec.name)
    if expected and not spec.tiny:
        out["expected_params"] = expected
        out["params_within_1pct"] = abs(spec.param_count() / expected - 1) < 0.01
        if not out["params_within_1pct"]:
            raise AssertionError(f"{spec.name}: {spec.param_count():.4g} parameters, model card says {expected:.3g}")
    try:
        import transformers
    except ImportError:
        out["transformers"] = "not installed"
        return out
    try:
        kwargs = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                      num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                      rope_theta=spec.rope_theta, rms_norm_eps=spec.rms_eps, tie_word_embeddings=spec.tie_embeddings)
        if spec.qkv_bias:
            config, cls = transformers.Qwen2Config(**kwargs), transformers.Qwen2ForCausalLM
        else:
            config, cls = transformers.LlamaConfig(**kwargs), transformers.LlamaForCausalLM
        with torch.device("meta"):
            model = cls(config)
        count = sum(p.numel() for p in model.parameters())
        out["transformers"] = {"version": transformers.__version__, "param_count": count,
                               "matches": count == spec.param_count()}
    except Exception as error:
        out["transformers"] = f"check failed: {type(error).__name__}: {error}"
    return out


class Progress:
    """A dependency-free progress bar on stderr (one line per update when not a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.start = max(1, total), 0, time.perf_counter()
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.width = 0

    @staticmethod
    def _clock(seconds: float) -> str:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def step(self, label: str = "", n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = int(28 * self.done / self.total)
        line = (f"[{'#' * filled}{'-' * (28 - filled)}] {self.done}/{self.total} "
                f"{self._clock(elapsed)} eta {self._clock(eta)}  {label}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def log(self, message: str) -> None:
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0
        print(message, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def summarize(report: dict) -> Tuple[List[dict], List[str]]:
    rows, lines = [], []
    lines.append(f"{'model':14s} {'config':9s} {'out tok/s':>10s} {'+-':>7s} {'total tok/s':>11s} "
                 f"{'vs baseline':>11s} {'latency s':>9s} {'p90 s':>7s}  kernels")
    for m in report["models"]:
        base = m["configs"].get("baseline", {}).get("output_tok_s", {}).get("mean")
        for name, c in m["configs"].items():
            mean = c["output_tok_s"]["mean"]
            row = {"model": m["name"], "config": name, "output_tok_s": mean, "output_tok_s_std": c["output_tok_s"]["std"],
                   "total_tok_s": c["total_tok_s"]["mean"], "latency_mean_s": c["latency_mean_s"]["mean"],
                   "latency_mean_s_std": c["latency_mean_s"]["std"], "latency_p90_s": c["latency_p90_s"]["mean"],
                   "vs_baseline": mean / base if base else None}
            rows.append(row)
            kernels = ",".join(sorted(set(c.get("kernels", {}).values()))) or "-"
            vs = f"{row['vs_baseline']:.3f}x" if base else ""
            lines.append(f"{m['name']:14s} {name:9s} {mean:10.1f} {row['output_tok_s_std']:7.1f} {row['total_tok_s']:11.1f} "
                         f"{vs:>11s} {row['latency_mean_s']:9.3f} {row['latency_p90_s']:7.3f}  {kernels}")
        acc = m.get("accuracy")
        if acc:
            cells = "  ".join(f"{v} {a['top1_agreement'] * 100:.2f}%" for v, a in acc["variants"].items())
            lines.append(f"{'':14s} accuracy (top-1 agreement with fp16, {acc['positions']} positions): {cells}; "
                         f"max |logit diff| {acc['max_logit_diff']:.4f}")
    return rows, lines


def finish_bars(fig, ax, centers, models, configs, ylabel: str, title: str, path: str) -> None:
    """Labels, legend under the axes, and the PNG: what both grouped-bar charts share."""
    import matplotlib.pyplot as plt

    ax.set_xticks(centers, [m["name"] for m in models])
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=len(configs), loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def charts(report: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in report["models"] if m["configs"]]
    if not models:
        return
    configs = list(models[0]["configs"])
    x = np.arange(len(models))
    width = 0.8 / len(configs)
    title = f"{report['device']}, batch of {report['settings']['batch_size']}, {report['workload_note']}"
    # Figure-2 style: generation throughput per model and variant, normalized to baseline.
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, name in enumerate(configs):
        heights, errs = [], []
        for m in models:
            base = m["configs"].get("baseline", m["configs"][configs[0]])["output_tok_s"]["mean"]
            c = m["configs"][name]["output_tok_s"]
            heights.append(c["mean"] / base)
            errs.append(c["std"] / base)
        ax.bar(x + i * width, heights, width, yerr=errs, capsize=2, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    finish_bars(fig, ax, x + width * (len(configs) - 1) / 2, models, configs, "output tokens/s, normalized to baseline",
                "End-to-end generation throughput\n" + title, os.path.join(out_dir, "e2e_throughput.png"))
    # Figure-3 style: mean per-request latency.
    fig, ax = plt.subplots(figsize=(11, 4.8))
    for i, name in enumerate(configs):
        c = [m["configs"][name]["latency_mean_s"] for m in models]
        ax.bar(x + i * width, [v["mean"] for v in c], width, yerr=[v["std"] for v in c], capsize=2, label=name)
    finish_bars(fig, ax, x + width * (len(configs) - 1) / 2, models, configs, "mean per-request latency, s",
                "End-to-end request latency\n" + title, os.path.join(out_dir, "e2e_latency.png"))


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

FULL = dict(num_prompts=32, batch_size=32, max_input=512, max_output=96, repeats=3, accuracy_prompts=8,
            accuracy_steps=32)
QUICK = dict(num_prompts=16, batch_size=16, max_input=256, max_output=32, repeats=2, accuracy_prompts=8,
             accuracy_steps=16)
CPU_QUICK = dict(num_prompts=8, batch_size=8, max_input=32, max_output=10, repeats=1, accuracy_prompts=4,
                 accuracy_steps=8)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults (full run): 32 prompts in one batch, at most 512 input / 96 output tokens, 3 repeats, "
               "all six models, all variants + default + fp16, accuracy on: sized for about 5 minutes on one H100 "
               "(--max-output and --repeats scale it linearly). "
               "--quick: llama3-8b and qwen1.5-1.8b, 16 prompts, 256/32 tokens, 2 repeats (< 2 minutes on an H100; "
               "tiny shapes and < 1 minute on the CPU backend).")
    parser.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS) + " or all (default all; "
                        "--quick: " + ",".join(QUICK_MODELS) + ")")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a GPTQ checkpoint directory (config.json + *.safetensors) instead of --models")
    parser.add_argument("--variants", default=None,
                        help=f"comma list of GPTQ configs: variants of opt4gptq.variants() and '{DEFAULT}' (no variant "
                             f"named: opt4gptq's own dispatch, e.g. its tensor-core kernel); default all variants + "
                             f"{DEFAULT}; baseline is always added")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per repeat (default 32)")
    parser.add_argument("--batch-size", type=int, default=None, help="requests per static batch (default 32)")
    parser.add_argument("--max-input", type=int, default=None, help="cap on prompt tokens (default 512)")
    parser.add_argument("--max-output", type=int, default=None, help="cap on output tokens (default 96)")
    parser.add_argument("--dataset", default=None, metavar="JSON",
                        help="ShareGPT_V3_unfiltered_cleaned_split.json: take its lengths (if the file exists)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per config (default 3; paper 15)")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=True,
                        help="top-1 agreement of each variant with fp16, teacher-forced (default on)")
    parser.add_argument("--accuracy-prompts", type=int, default=None,
                        help="prompts in the accuracy batch (default 8, at most 16: decode M stays in the exllama range)")
    parser.add_argument("--accuracy-steps", type=int, default=None, help="decode positions per prompt (default 32)")
    parser.add_argument("--logit-std", type=float, default=5.0, help="std of the random model's logits (default 5)")
    parser.add_argument("--exllama-max-rows", type=int, default=None,
                        help="named variants: force the exllama kernels up to this many rows (vLLM 0.3.3's "
                             "crossover: 50); default: opt4gptq's own dispatch (README, 'Which kernel runs': "
                             "exllama up to 19 rows for a named variant, then dequantize + cuBLAS)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="CUDA graphs for decode steps (GPU only; default on)")
    parser.add_argument("--check-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="re-run the fp16 model eagerly and compare tokens with its graph run (default: --quick)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the GPU when opt4gptq has a GPU build and sees one, else tiny CPU models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run (see below)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="directory for bench_e2e.json, e2e_summary.txt and PNGs")
    args = parser.parse_args(argv)

    gpu_ok = opt4gptq.backend() != "cpu" and bool(opt4gptq.devices()) and torch.cuda.is_available()
    if args.device == "cuda" and not gpu_ok:
        parser.error("--device cuda: no GPU build of opt4gptq or no GPU visible")
    args.device = "cuda" if (args.device != "cpu" and gpu_ok) else "cpu"
    base = (CPU_QUICK if args.device == "cpu" else QUICK) if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = ",".join(QUICK_MODELS) if args.quick else "all"
    args.models = list(MODELS) if args.models == "all" else args.models.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    args.variants = args.variants.split(",") if args.variants else opt4gptq.variants() + [DEFAULT]
    for name in args.variants:
        if name not in opt4gptq.variants() + [DEFAULT]:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(opt4gptq.variants() + [DEFAULT])}")
    if "baseline" not in args.variants:
        args.variants.insert(0, "baseline")
    if args.check_graphs is None:
        args.check_graphs = args.quick
    if args.exllama_max_rows is not None and not 0 < args.exllama_max_rows <= 50:
        parser.error("--exllama-max-rows must be within 1..50")
    args.accuracy_prompts = min(args.accuracy_prompts, 16)  # keep decode M under the exllama crossover
    return args


def workload_pairs(args) -> Tuple[List[Tuple[int, int]], str]:
    note = (f"ShareGPT-like synthetic lengths (log-normal with ShareGPT's means {SHAREGPT_MEAN_INPUT:.0f}/"
            f"{SHAREGPT_MEAN_OUTPUT:.0f}, vLLM's filter)")
    pairs = None
    if args.dataset:
        if os.path.exists(args.dataset):
            pairs = dataset_lengths(args.dataset, args.num_prompts, args.seed)
            note = f"ShareGPT lengths from {os.path.basename(args.dataset)} (~4 chars/token)"
        else:
            print(f"dataset {args.dataset} not found: using the synthetic ShareGPT sampler", flush=True)
            note += f" (dataset {args.dataset} not found)"
    if pairs is None:
        pairs = synthetic_lengths(args.num_prompts, args.seed)
    capped = [(min(p, args.max_input), min(o, args.max_output)) for p, o in pairs]
    return capped, note + f", capped at {args.max_input}/{args.max_output}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    use_graphs = args.graphs and device == "cuda"
    pairs, note = workload_pairs(args)
    bucket = 128 if device == "cuda" else 16
    ctx_max = -(-max(p + o for p, o in pairs) // bucket) * bucket
    rows = min(args.batch_size, args.num_prompts)
    acc_pairs = [(p, args.accuracy_steps + 1) for p, _ in pairs[:min(args.accuracy_prompts, rows)]]
    ctx_max = max(ctx_max, -(-max(p + o for p, o in acc_pairs) // bucket) * bucket)
    if args.model:
        specs = [None]
    else:
        specs = [MODELS[name].shrunk() if device == "cpu" else MODELS[name] for name in args.models]
    configs = [FP16] + args.variants
    units = len(specs) * (1 + (1 if args.accuracy else 0) + len(configs) * (1 + args.repeats) + (1 if args.check_graphs else 0))
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    print(f"bench_e2e: {device_name}, opt4gptq {opt4gptq.__version__} ({opt4gptq.backend()}), torch {torch.__version__}; "
          f"{len(specs)} model(s) x {len(configs)} configs x {args.repeats} repeats; "
          f"{args.num_prompts} prompts, batch {args.batch_size}; {note}"
          + ("" if device == "cuda" else "; no GPU: tiny CPU shapes"), flush=True)
    if DEFAULT in args.variants and os.environ.get("OPT4GPTQ_VARIANT"):
        print(f"note: OPT4GPTQ_VARIANT={os.environ['OPT4GPTQ_VARIANT']} is set, so the '{DEFAULT}' config runs that "
              f"variant, not opt4gptq's own dispatch", flush=True)
    progress = Progress(units, enabled=not args.no_progress)
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
              "opt4gptq": opt4gptq.__version__, "backend": opt4gptq.backend(), "torch": torch.__version__,
              "python": platform.python_version(), "device": device_name,
              "OPT4GPTQ_VARIANT": os.environ.get("OPT4GPTQ_VARIANT"),
              "mode": "gpu" if device == "cuda" else "cpu-tiny", "graphs": use_graphs,
              "settings": {k: getattr(args, k) for k in ("models", "model", "variants", "num_prompts", "batch_size",
                                                          "max_input", "max_output", "dataset", "repeats", "accuracy",
                                                          "accuracy_prompts", "accuracy_steps", "logit_std",
                                                          "exllama_max_rows", "seed", "quick")},
              "workload_note": note, "bits": BITS, "group_size": GROUP_SIZE, "models": []}
    report["workload"] = {"lengths": pairs, "input_tokens": sum(p for p, _ in pairs),
                          "output_tokens": sum(o for _, o in pairs),
                          "mean_input": statistics.fmean(p for p, _ in pairs),
                          "mean_output": statistics.fmean(o for _, o in pairs), "kv_bucket": bucket, "ctx_max": ctx_max}
    torch.manual_seed(args.seed)
    for index, spec in enumerate(specs):
        start = time.perf_counter()
        with torch.no_grad():  # not inference_mode: opt4gptq reads tensor versions of GPU index tensors
            if args.model:
                spec, quant, dense = load_checkpoint(args.model, device)
                source = args.model
            else:
                seed = args.seed + zlib.crc32(spec.name.encode()) % 100000
                quant, dense = random_weights(spec, device, seed, args.logit_std)
                source = "random"
            build_s = time.perf_counter() - start
            check = crosscheck(spec)
            progress.log(f"{spec.name}{' (tiny)' if spec.tiny else ''}: {spec.param_count() / 1e9:.3f}B parameters, "
                         f"{spec.layers} layers, hidden {spec.hidden}, built in {build_s:.1f}s; "
                         f"transformers cross-check: {check.get('transformers')}")
            progress.step(f"{spec.name}: weights")
            engine = Engine(spec, rows, ctx_max, max(args.max_output, args.accuracy_steps + 1),
                            device, args.exllama_max_rows)
            bseed = args.seed + 7 * index
            batches = [make_batch(pairs[i:i + args.batch_size], spec.vocab, bseed + i, device, bucket, engine.rows, ctx_max)
                       for i in range(0, len(pairs), args.batch_size)]
            entry = {"name": spec.name, "tiny": spec.tiny, "source": source, "spec": asdict(spec),
                     "crosscheck": check, "build_s": build_s, "configs": {}}
            if args.accuracy:
                acc_batch = make_batch(acc_pairs, spec.vocab, bseed + 999, device, bucket, engine.rows, ctx_max)
                entry["accuracy"] = accuracy(engine, quant, dense, args.variants, acc_batch, progress)
            fp16_tokens = None
            for name in configs:
                engine.use(dense if name == FP16 else quant, name)
                result, tokens = run_config(engine, batches, args.repeats, use_graphs, progress, f"{spec.name}/{name}")
                entry["configs"][name] = result
                if name == FP16:
                    fp16_tokens = tokens
                progress.log(f"  {spec.name:13s} {name:9s} {result['output_tok_s']['mean']:9.1f} out tok/s "
                             f"(+-{result['output_tok_s']['std']:.1f})  latency {result['latency_mean_s']['mean']:.3f}s"
                             + (f"  [{', '.join(sorted(set(result['kernels'].values())))}]" if result["kernels"] else ""))
            if args.check_graphs:
                if use_graphs:
                    engine.use(dense, FP16)
                    entry["graph_check"] = graph_check(engine, batches, fp16_tokens)
                    progress.log(f"  graphs vs eager (fp16): {entry['graph_check']['tokens_equal_fraction'] * 100:.2f}% "
                                 f"of {entry['graph_check']['tokens']} tokens equal")
                progress.step("graph check")
            entry["seconds"] = time.perf_counter() - start
            report["models"].append(entry)
            del engine, quant, dense, batches
            if device == "cuda":
                torch.cuda.empty_cache()
    progress.close()
    report["summary"], lines = summarize(report)
    print(f"\nend-to-end generation ({device_name}; {note}):")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_e2e.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "e2e_summary.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            charts(report, args.out)
        except ImportError:
            print("matplotlib not installed: no charts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
