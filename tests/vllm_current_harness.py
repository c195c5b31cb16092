"""Loads current vLLM's GPTQ linear layer from its real source, without compiled
parts and without the rest of vLLM.

Current vLLM (0.33.0) serves `--quantization gptq` with `AutoGPTQLinearMethod`
(vllm/model_executor/layers/quantization/auto_gptq.py), which hands the weights
to an `MPLinearKernel` chosen per platform; `ExllamaLinearKernel` is the one
that calls `ops.gptq_shuffle` and `ops.gptq_gemm` (`vllm._custom_ops`). Those
modules, and what they need at run time (parameter classes, scalar types,
packing helpers, vLLM's plugin loader), are vLLM's own files from the PyPI wheel
(`SOURCE_FILES`, cached under $OPT4GPTQ_VLLM_CACHE/vllm-0.33.0/src).

Stubbed, because importing them drags in all of vLLM or needs its compiled
parts: the package `__init__`s (bare packages instead), `vllm.envs`,
`vllm.logger`, `vllm.platforms` (a CUDA-like platform), `vllm.distributed`
(tensor-parallel rank 0 of 1), fused MoE, marlin utilities, the base classes
of `linear` / `base_config`, transformers and safetensors. Kernel selection is
stubbed as what `--linear-backend exllama` does: ExllamaLinearKernel if its own
`can_implement` accepts the layer, else an error. A stubbed name that the code
under test actually uses fails loudly (`Unprovided`).

vLLM's `_custom_ops.gptq_gemm` / `gptq_shuffle` are real and call
`torch.ops._C`, which does not exist here: reaching them fails, so a test that
passes was served by opt4gptq.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import types
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

import vllm_harness

VLLM_VERSION = "0.33.0"
EXLLAMA_MODULE = "vllm.model_executor.kernels.linear.mixed_precision.exllama"
AUTO_GPTQ_MODULE = "vllm.model_executor.layers.quantization.auto_gptq"
PLUGINS_MODULE = "vllm.plugins"

SOURCE_FILES = (
    "vllm/_custom_ops.py",
    "vllm/scalar_type.py",
    "vllm/plugins/__init__.py",
    "vllm/utils/math_utils.py",
    "vllm/utils/collection_utils.py",
    "vllm/model_executor/parameter.py",
    "vllm/model_executor/utils.py",
    "vllm/model_executor/kernels/linear/mixed_precision/MPLinearKernel.py",
    "vllm/model_executor/kernels/linear/mixed_precision/exllama.py",
    "vllm/model_executor/layers/quantization/auto_gptq.py",
    "vllm/model_executor/layers/quantization/utils/__init__.py",
    "vllm/model_executor/layers/quantization/utils/layer_utils.py",
    "vllm/model_executor/layers/quantization/utils/quant_utils.py",
    "vllm/model_executor/layers/quantization/utils/gptq_utils.py",
)

# Packages whose __init__ would import all of vLLM: only their folders are used.
BARE_PACKAGES = (
    "vllm",
    "vllm.utils",
    "vllm.model_executor",
    "vllm.model_executor.layers",
    "vllm.model_executor.layers.quantization",
    "vllm.model_executor.kernels",
    "vllm.model_executor.kernels.linear",
    "vllm.model_executor.kernels.linear.mixed_precision",
)


def fetch_source() -> Path:
    return vllm_harness.fetch_wheel_sources(VLLM_VERSION, SOURCE_FILES)


# --- stand-ins -------------------------------------------------------------------------


def unprovided(qualname: str) -> type:
    """A name the code under test imports but must not use here."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"test harness stub `{qualname}` was used by the code under test")

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": refuse, "__call__": refuse})


def stub_module(name: str, attrs: Optional[Dict[str, Any]] = None, placeholders: bool = False,
                path: Optional[Path] = None) -> types.ModuleType:
    """A module with `attrs`; other names are an ImportError, or Unprovided with `placeholders`."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs or {})
    if path is not None:
        module.__path__ = [str(path)]
    if placeholders:
        def __getattr__(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            value = unprovided(f"{name}.{attr}")
            setattr(module, attr, value)
            return value

        module.__getattr__ = __getattr__
    return module


class OnceLogger(logging.LoggerAdapter):
    """vLLM's loggers have *_once methods."""

    def info_once(self, msg, *args, **kwargs):
        self.info(msg, *args)

    def warning_once(self, msg, *args, **kwargs):
        self.warning(msg, *args)

    def debug_once(self, msg, *args, **kwargs):
        self.debug(msg, *args)


def vllm_logger(name: str) -> OnceLogger:
    return OnceLogger(logging.getLogger(name), {})


class CudaLikePlatform:
    """Enough of vllm.platforms.current_platform for the GPTQ layer: a CUDA-like device."""

    def import_kernels(self) -> None:
        pass  # the compiled kernels are exactly what is not here

    def is_cuda_alike(self) -> bool:
        return True

    def is_rocm(self) -> bool:
        return False

    def is_cpu(self) -> bool:
        return False

    def is_xpu(self) -> bool:
        return False

    def fp8_dtype(self):
        import torch

        return torch.float8_e4m3fn

    def get_device_capability(self, device_id: int = 0):
        return None

    def use_sync_weight_loader(self) -> bool:
        return False  # only lazy (TPU) tensors need it


def set_weight_attrs(weight, attrs) -> None:
    for key, value in (attrs or {}).items():
        setattr(weight, key, value)


def is_torch_equal_or_newer(target: str) -> bool:
    import torch

    return torch.torch_version.TorchVersion(torch.__version__) >= target


def choose_exllama(config, compute_capability=None):
    """What vLLM's kernel choice does under `--linear-backend exllama`."""
    kernel = sys.modules[EXLLAMA_MODULE].ExllamaLinearKernel
    ok, reason = kernel.can_implement(config)
    if not ok:
        raise ValueError(f"ExllamaLinearKernel cannot implement this layer: {reason}")
    return kernel


def marlin_repeat_scales_on_all_ranks(group_size: int, is_row_parallel: bool) -> bool:
    return group_size == -1 and is_row_parallel  # one group, sharded input: every rank needs all scales


class LinearMethodBase:
    pass


class QuantizationConfig:
    def __init__(self):
        pass


def environment(plugins=None) -> types.ModuleType:
    """vllm.envs: what the plugin loader reads (VLLM_PLUGINS, None = load all),
    and what _custom_ops reads at import."""
    return stub_module("vllm.envs", {"VLLM_PLUGINS": plugins, "VLLM_ROCM_FP8_MFMA_PAGE_ATTN": False})


def stubs(source: Path) -> Dict[str, types.ModuleType]:
    root = source / "vllm"
    modules = {name: stub_module(name, path=root.joinpath(*name.split(".")[1:])) for name in BARE_PACKAGES}
    modules["vllm"].__version__ = VLLM_VERSION
    modules["vllm.model_executor.layers.quantization"].QuantizationMethods = str
    modules["vllm.model_executor.kernels.linear"].choose_mp_linear_kernel = choose_exllama
    plain = {
        "vllm.envs": environment(),
        "vllm.logger": stub_module("vllm.logger", {"init_logger": vllm_logger}),
        "vllm.platforms": stub_module("vllm.platforms", {"current_platform": CudaLikePlatform()}),
        "vllm.distributed": stub_module("vllm.distributed", {"get_tensor_model_parallel_rank": lambda: 0,
                                                             "get_tensor_model_parallel_world_size": lambda: 1}),
        "vllm.utils.torch_utils": stub_module("vllm.utils.torch_utils",
                                              {"is_torch_equal_or_newer": is_torch_equal_or_newer}),
        "vllm.model_executor.layers.linear": stub_module(
            "vllm.model_executor.layers.linear",
            {"LinearMethodBase": LinearMethodBase, "set_weight_attrs": set_weight_attrs}, placeholders=True),
        "vllm.model_executor.layers.quantization.base_config": stub_module(
            "vllm.model_executor.layers.quantization.base_config", {"QuantizationConfig": QuantizationConfig},
            placeholders=True),
        "vllm.model_executor.layers.quantization.utils.marlin_utils": stub_module(
            "vllm.model_executor.layers.quantization.utils.marlin_utils",
            {"verify_marlin_supported": lambda **kwargs: None,
             "marlin_repeat_scales_on_all_ranks": marlin_repeat_scales_on_all_ranks,
             "get_marlin_input_dtype": lambda prefix=None: None}, placeholders=True),
    }
    modules.update(plain)
    for name in ("vllm.distributed.parallel_state", "vllm.utils.flashinfer",
                 "vllm.model_executor.layers.vocab_parallel_embedding",
                 "vllm.model_executor.layers.fused_moe", "vllm.model_executor.layers.fused_moe.oracle",
                 "vllm.model_executor.layers.fused_moe.oracle.int_wna16", "vllm.transformers_utils",
                 "vllm.transformers_utils.config", "transformers", "safetensors", "safetensors.torch"):
        modules[name] = stub_module(name, placeholders=True)
    modules["safetensors.torch"]._TYPES = {}
    if importlib.util.find_spec("regex") is None:
        modules["regex"] = re  # gptq_utils imports regex, a drop-in for re where it is used
    return modules


# --- install / uninstall ---------------------------------------------------------------

_saved: Dict[str, Optional[types.ModuleType]] = {}


def install(source: Path) -> types.SimpleNamespace:
    """Makes current vLLM's GPTQ layer importable; returns its modules (not yet patched)."""
    uninstall()
    for name, module in stubs(source).items():
        _saved.setdefault(name, sys.modules.get(name))
        sys.modules[name] = module
    exllama = importlib.import_module(EXLLAMA_MODULE)
    # vllm.model_executor.kernels.linear re-exports the config class of the real kernel module.
    sys.modules["vllm.model_executor.kernels.linear"].MPLinearLayerConfig = exllama.MPLinearLayerConfig
    return types.SimpleNamespace(
        exllama=exllama,
        auto_gptq=importlib.import_module(AUTO_GPTQ_MODULE),
        custom_ops=importlib.import_module("vllm._custom_ops"),
        parameter=importlib.import_module("vllm.model_executor.parameter"),
    )


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
    for name, module in _saved.items():
        if name.startswith("vllm"):
            continue
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    _saved.clear()


# --- a GPTQ layer as vLLM builds it ----------------------------------------------------


def symmetric_checkpoint(k: int, n: int, bits: int, group_size: int, rng):
    """Random GPTQ tensors of a symmetric checkpoint (what current vLLM's GPTQ
    accepts): every stored v1 zero is 2**(bits-1) - 1."""
    from opt4gptq import pack

    t = pack.random_gptq(k, n, bits, group_size, rng=rng)
    groups = t.scales.shape[0]
    t.qzeros = pack.pack_cols(np.full((groups, n), (1 << (bits - 1)) - 1), bits)
    return t


def shard_rows(t, start: int, k: int):
    """Rows start..start+k of a checkpoint, with their groups: one rank's part of a
    row-parallel layer (without act-order, a rank's groups are contiguous)."""
    from opt4gptq import pack

    rows = pack.unpack_rows(t.qweight, t.bits)[start:start + k]
    size = t.k if t.group_size == -1 else t.group_size
    first, last = (0, 1) if t.group_size == -1 else (start // size, (start + k) // size)
    g_idx = (t.g_idx[start:start + k] - first).astype(np.int32)
    return pack.GPTQTensors(qweight=pack.pack_rows(rows, t.bits), qzeros=t.qzeros[first:last].copy(),
                            scales=t.scales[first:last].copy(), g_idx=g_idx, bits=t.bits, group_size=t.group_size)


def build_layer(vllm, bits: int, group_size: int, k: int, n_parts, rng, device: str = "cpu",
                full_k: Optional[int] = None, rank: int = 0):
    """An nn.Module set up by vLLM's AutoGPTQLinearMethod, with a random symmetric
    checkpoint loaded and process_weights_after_loading run. full_k > k makes it
    a row-parallel layer holding rank `rank`'s k rows. Returns (method, layer,
    the tensors it holds)."""
    import torch

    n = sum(n_parts)
    full_k = k if full_k is None else full_k
    config = vllm.auto_gptq.AutoGPTQConfig(weight_bits=bits, group_size=group_size, desc_act=False, is_sym=True,
                                           lm_head_quantized=False, dynamic={}, full_config={})
    method = vllm.auto_gptq.AutoGPTQLinearMethod(config)
    layer = torch.nn.Module()
    with torch.device(device):
        method.create_weights(layer, k, list(n_parts), full_k, n, torch.float16, weight_loader=None)
    t = shard_rows(symmetric_checkpoint(full_k, n, bits, group_size, rng), rank * k, k)
    for name in ("qweight", "qzeros", "scales"):
        param = getattr(layer, name)
        value = getattr(t, name)
        assert tuple(param.shape) == value.shape, f"vLLM sized {name} {tuple(param.shape)}, checkpoint {value.shape}"
        param.data.copy_(torch.from_numpy(value))
    method.process_weights_after_loading(layer)
    return method, layer, t


def serve_one_layer(vllm) -> bool:
    """True when vLLM's layer ran through opt4gptq and matched the reference (child processes)."""
    import torch

    import opt4gptq
    from opt4gptq import pack

    rng = np.random.default_rng(0)
    try:
        method, layer, t = build_layer(vllm, 4, 128, 256, [64], rng)
        x = rng.standard_normal((2, 256)).astype(np.float16)
        out = method.apply(layer, torch.from_numpy(x)).numpy().astype(np.float64)
    except AttributeError as error:  # vLLM's own op was reached: torch.ops._C has none here
        if "gptq" not in str(error):
            raise
        return False
    ref = pack.reference_gemm(x, t.qweight, t.qzeros, t.scales, None, 4)
    return opt4gptq.last_kernel() == "cpu" and np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-3
