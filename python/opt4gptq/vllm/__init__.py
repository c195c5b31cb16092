"""Serve vLLM 0.3.3's GPTQ layers with opt4gptq.

``patch()`` replaces what vLLM's GPTQ layer calls as ``ops.gptq_gemm`` and
``ops.gptq_shuffle`` (in ``vllm.model_executor.layers.quantization.gptq``) by
opt4gptq's ops and leaves every other vLLM op alone. ``unpatch()`` undoes it.
``python -m opt4gptq.vllm SCRIPT ARGS...`` runs an unchanged vLLM script with
the patch (see README, "Use with vLLM").

The patch must be in place before vLLM shuffles a layer's weights (its first
forward): our shuffled layout differs from vLLM's. A weight that reaches the
exllama path without having been shuffled by us is refused with an
explanation, never computed in the wrong layout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import os
import sys
from typing import Any, Optional

import opt4gptq

GPTQ_MODULE = "vllm.model_executor.layers.quantization.gptq"
SUPPORTED_VERSIONS = ("0.3.3",)
ENV_VAR = "OPT4GPTQ_PATCH_VLLM"
_LAYOUT_MARK = "_opt4gptq_layout"

logger = logging.getLogger("opt4gptq.vllm")


def vllm_version() -> Optional[str]:
    """The installed vLLM's version, without importing vLLM's heavy top level."""
    module = sys.modules.get("vllm")
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("vllm")
    except Exception:
        return None


class _OpsProxy:
    """Stands in for vLLM's compiled ``ops`` inside the GPTQ module: our two ops,
    every other attribute from the original."""

    def __init__(self, original: Any, variant: Optional[str]):
        self._original = original
        self._variant = variant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def gptq_shuffle(self, q_weight, q_perm, bit):
        opt4gptq.gptq_shuffle(q_weight, q_perm, bit)
        setattr(q_weight, _LAYOUT_MARK, True)

    def gptq_gemm(self, a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, bit):
        if use_exllama and not getattr(b_q_weight, _LAYOUT_MARK, False):
            raise RuntimeError(
                "opt4gptq: this GPTQ layer's weights were shuffled by vLLM's own gptq_shuffle before "
                "opt4gptq.vllm.patch() was applied, so they are in vLLM's layout, not ours. Apply the patch "
                "before the model's first forward pass (python -m opt4gptq.vllm SCRIPT, or "
                f"{ENV_VAR}=1), or call opt4gptq.vllm.unpatch() to keep vLLM's kernels.")
        return opt4gptq.gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, bit,
                                  variant=self._variant)


def is_patched() -> bool:
    module = sys.modules.get(GPTQ_MODULE)
    return module is not None and isinstance(getattr(module, "ops", None), _OpsProxy)


def patch(variant: Optional[str] = None) -> None:
    """Route vLLM 0.3.3's GPTQ ops to opt4gptq (idempotent).

    variant: the Opt4GPTQ variant to serve with (default: OPT4GPTQ_VARIANT, then
    opt4gptq.default_variant()). Raises RuntimeError, changing nothing, for a
    vLLM version this patch was not written for.
    """
    version = vllm_version()
    if version not in SUPPORTED_VERSIONS:
        raise RuntimeError(
            f"opt4gptq.vllm.patch() supports vLLM {', '.join(SUPPORTED_VERSIONS)}; found vLLM {version}. "
            "Nothing was patched.")
    module = importlib.import_module(GPTQ_MODULE)
    if isinstance(module.ops, _OpsProxy):
        return
    module.ops = _OpsProxy(module.ops, variant)
    logger.warning("opt4gptq %s serves vLLM %s GPTQ layers: backend %s, variant %s",
                   opt4gptq.__version__, version, opt4gptq.backend(),
                   variant or os.environ.get("OPT4GPTQ_VARIANT") or opt4gptq.default_variant())


def unpatch() -> None:
    """Give vLLM its own GPTQ ops back."""
    module = sys.modules.get(GPTQ_MODULE)
    if module is not None and isinstance(module.ops, _OpsProxy):
        module.ops = module.ops._original


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies patch() right after vLLM's GPTQ module is first imported, so a
    script that imports vLLM later (and vLLM's worker processes) get it too."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != GPTQ_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_then_patch(module):
            original_exec(module)
            patch()

        spec.loader.exec_module = exec_then_patch
        return spec


def install_import_hook() -> None:
    """Patch vLLM's GPTQ module whenever it gets imported in this process."""
    if GPTQ_MODULE in sys.modules:
        patch()
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def autopatch_from_environment() -> None:
    """What `OPT4GPTQ_PATCH_VLLM=1` turns on (called at opt4gptq.vllm import)."""
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        install_import_hook()


autopatch_from_environment()
