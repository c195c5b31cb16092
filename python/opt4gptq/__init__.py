"""opt4gptq: fast, correct GPTQ GEMM kernels for vLLM on ROCm and CUDA.

The engine is Rust with HIP/CUDA kernels (``opt4gptq._C``); this package is
its face. Start with ``python -m opt4gptq`` to check an install.
"""

from __future__ import annotations

from typing import List

from . import _C
from .ops import gptq_gemm, gptq_shuffle, last_kernel

__version__: str = _C.__version__

__all__ = ["__version__", "backend", "default_variant", "devices", "gptq_gemm", "gptq_shuffle", "last_kernel", "pack", "variants"]


def backend() -> str:
    """'cpu', 'cuda' or 'rocm': the GPU platform this build was compiled for.

    Every build also serves CPU (numpy / torch CPU) arrays.
    """
    return _C.backend()


def devices() -> List[str]:
    """Names of the GPUs this build can use; empty for a CPU build or without a GPU."""
    return list(_C.devices())


def variants() -> List[str]:
    """The kernel variants of the Opt4GPTQ ablation: baseline (vLLM 0.3.3's
    algorithm), smb, vml, ila, and opt4gptq (all three)."""
    return list(_C.variants())


def default_variant() -> str:
    """The variant used when neither ``variant=`` nor ``OPT4GPTQ_VARIANT`` names one."""
    return _C.default_variant()


def __getattr__(name: str):
    # `opt4gptq.pack` imports numpy-heavy helpers only when asked for.
    if name == "pack":
        import importlib

        return importlib.import_module(".pack", __name__)
    raise AttributeError(f"module 'opt4gptq' has no attribute {name!r}")
