"""Serve vLLM's GPTQ layers with opt4gptq: vLLM 0.3.3 (the Opt4GPTQ paper's)
and current vLLM (0.33.0).

Each has one module that calls ``ops.gptq_gemm`` and ``ops.gptq_shuffle``:
vLLM 0.3.3's GPTQ layer (``vllm.model_executor.layers.quantization.gptq``, with
act-order ``g_idx``) and current vLLM's ``ExllamaLinearKernel``
(``vllm.model_executor.kernels.linear.mixed_precision.exllama``: no ``g_idx``,
since current vLLM refuses act-order GPTQ, and a ``use_v2_format`` flag).
``patch()`` gives that module an ``ops`` in which those two go to opt4gptq and
every other name still reaches vLLM's own; ``unpatch()`` undoes it.

Ways in (see README, "Use with vLLM"): ``python -m opt4gptq.vllm SCRIPT
ARGS...``; ``OPT4GPTQ_PATCH_VLLM=1`` in the environment (any Python process,
through the wheel's .pth file); for current vLLM also :func:`register`, the
``vllm.general_plugins`` entry point, on unless ``OPT4GPTQ_PATCH_VLLM=0``.

The patch must be in place before vLLM shuffles a layer's weights (0.3.3: its
first forward; current vLLM: ``process_weights_after_loading``), because our
shuffled layout differs from vLLM's. A weight that reaches the exllama path
without having been shuffled by us is refused with an explanation, never
computed in the wrong layout.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import opt4gptq

GPTQ_MODULE = "vllm.model_executor.layers.quantization.gptq"
EXLLAMA_MODULE = "vllm.model_executor.kernels.linear.mixed_precision.exllama"
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


def _mark_tensor(q_weight) -> None:
    """vLLM 0.3.3 hands the very tensor it shuffled to every gemm: an attribute on it tells."""
    setattr(q_weight, _LAYOUT_MARK, True)


def _tensor_marked(q_weight) -> bool:
    return getattr(q_weight, _LAYOUT_MARK, False)


class _StorageMarks:
    """Which weights our gptq_shuffle laid out, for current vLLM, which re-wraps
    the shuffled data in a new Parameter: only the storage is the same.

    Storages are held weakly, so an entry goes with its weight and a later
    tensor at the same address is not mistaken for ours. That needs a torch
    whose storages keep one Python object for life (current vLLM's torch does);
    on vLLM 0.3.3's torch 2.1.2 they do not, and dereferencing such a weak
    reference crashes the process, hence the attribute there.
    """

    def __init__(self):
        self._storages: dict = {}

    @staticmethod
    def _key(storage) -> tuple:
        return (str(storage.device), storage.data_ptr())

    def mark(self, q_weight) -> None:
        storage = q_weight.untyped_storage()
        if q_weight.untyped_storage() is not storage:
            raise RuntimeError(f"opt4gptq.vllm needs a newer torch for current vLLM (found {_torch_version()})")
        key = self._key(storage)

        def forget(ref, key=key):
            if self._storages.get(key) is ref:
                del self._storages[key]

        self._storages[key] = weakref.ref(storage, forget)

    def holds(self, q_weight) -> bool:
        storage = q_weight.untyped_storage()
        ref = self._storages.get(self._key(storage))
        return ref is not None and ref() is storage


_STORAGE_MARKS = _StorageMarks()


def _torch_version() -> str:
    return getattr(sys.modules.get("torch"), "__version__", "none")


def _foreign_layout_error(when: str) -> RuntimeError:
    return RuntimeError(
        "opt4gptq: this GPTQ layer's weights were shuffled by vLLM's own gptq_shuffle before "
        "opt4gptq.vllm.patch() was applied, so they are in vLLM's layout, not ours. Apply the patch "
        f"{when}, or call opt4gptq.vllm.unpatch() to keep vLLM's kernels.")


def _require_our_storage(b_q_weight, when: str) -> None:
    if not _STORAGE_MARKS.holds(b_q_weight):
        raise _foreign_layout_error(when)


class _OpsProxy:
    """Stands in for vLLM's ``ops`` inside one module: our two ops, every other
    attribute from the original."""

    def __init__(self, original: Any, variant: Optional[str]):
        self._original = original
        self._variant = variant

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


_LEGACY_WHEN = f"before the model's first forward pass (python -m opt4gptq.vllm SCRIPT, or {ENV_VAR}=1)"
_CURRENT_WHEN = ("before vLLM loads the model (process_weights_after_loading shuffles): let vLLM load the "
                 f"opt4gptq plugin (on unless {ENV_VAR}=0), or use python -m opt4gptq.vllm SCRIPT")


class _LegacyOps(_OpsProxy):
    """vLLM 0.3.3's ``vllm._C.ops`` signatures (act-order ``g_idx``, no v2 format)."""

    def gptq_shuffle(self, q_weight, q_perm, bit):
        opt4gptq.gptq_shuffle(q_weight, q_perm, bit)
        _mark_tensor(q_weight)

    def gptq_gemm(self, a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, bit):
        if use_exllama and not _tensor_marked(b_q_weight):
            raise _foreign_layout_error(_LEGACY_WHEN)
        return opt4gptq.gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, bit,
                                  variant=self._variant)


class _ExllamaKernelOps(_OpsProxy):
    """Current vLLM's ``vllm._custom_ops`` signatures, as ExllamaLinearKernel calls them.

    vLLM compiles models with ``torch.compile(fullgraph=True)``, so gptq_gemm is
    one opaque torch op (``opt4gptq::vllm_gptq_gemm``), layout check included;
    gptq_shuffle runs at load time, eagerly."""

    def __init__(self, original: Any, variant: Optional[str]):
        super().__init__(original, variant)
        from . import _torch_op

        self._gemm = _torch_op.vllm_gptq_gemm

    def gptq_shuffle(self, q_weight, bit):
        opt4gptq.gptq_shuffle(q_weight, None, bit)  # no act-order in current vLLM: the layout stays GPTQ's
        _STORAGE_MARKS.mark(q_weight)

    def gptq_gemm(self, a, b_q_weight, b_gptq_qzeros, b_gptq_scales, use_exllama, use_v2_format, bit):
        return self._gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, use_exllama, use_v2_format, bit,
                          self._variant)


@dataclass(frozen=True)
class _Target:
    """One vLLM generation: its versions, the module whose ``ops`` we replace and
    how, and (where vLLM's ops are Python functions) the parameters they must have."""

    versions: Tuple[str, ...]
    module: str
    proxy: type
    serves: str
    signatures: Optional[dict] = None


_LEGACY = _Target(("0.3.3",), GPTQ_MODULE, _LegacyOps, "GPTQ layers")
_CURRENT = _Target(
    ("0.33.0",), EXLLAMA_MODULE, _ExllamaKernelOps,
    "ExllamaLinearKernel layers (vLLM gives it GPTQ layers with --linear-backend exllama, or where no "
    "kernel ahead of it fits)",
    signatures={
        "gptq_gemm": ("a", "b_q_weight", "b_gptq_qzeros", "b_gptq_scales", "use_exllama", "use_v2_format", "bit"),
        "gptq_shuffle": ("q_weight", "bit"),
    })
_TARGETS = (_CURRENT, _LEGACY)
SUPPORTED_VERSIONS = tuple(v for target in _TARGETS for v in target.versions)


def _target_for(version: Optional[str]) -> Optional[_Target]:
    """Local build tags (``0.3.3+rocm...``, ``0.33.0+cu130``) do not change the Python source."""
    public = (version or "").split("+", 1)[0]
    return next((t for t in _TARGETS if public in t.versions), None)


def _unsupported(version: Optional[str]) -> str:
    return (f"opt4gptq.vllm serves current vLLM ({', '.join(_CURRENT.versions)}) through its ExllamaLinearKernel "
            f"and supports vLLM {', '.join(_LEGACY.versions)}; found vLLM {version}. Nothing was patched.")


def _parameters(function) -> tuple:
    try:
        return tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):  # a compiled function in some build: unknown, so not ours
        return ("<not inspectable>",)


def _check_signatures(target: _Target, ops: Any, version: str) -> None:
    """A build that carries a listed version number but other op parameters is refused."""
    for name, expected in (target.signatures or {}).items():
        found = _parameters(getattr(ops, name))
        if found != expected:
            raise RuntimeError(
                f"opt4gptq: vLLM {version}'s ops.{name} takes ({', '.join(found)}), opt4gptq was written for "
                f"({', '.join(expected)}). Nothing was patched; set {ENV_VAR}=0 to stop trying.")


def _proxy_in(module: Any) -> Optional[_OpsProxy]:
    ops = getattr(module, "ops", None)
    return ops if isinstance(ops, _OpsProxy) else None


def is_patched() -> bool:
    """Whether a vLLM GPTQ module in this process now calls opt4gptq's ops."""
    return any(_proxy_in(sys.modules.get(t.module)) is not None for t in _TARGETS)


def patch(variant: Optional[str] = None) -> None:
    """Route the installed vLLM's GPTQ ops to opt4gptq (idempotent).

    variant: the Opt4GPTQ variant to serve with (default: OPT4GPTQ_VARIANT, then
    opt4gptq.default_variant()). Raises RuntimeError, changing nothing, for a
    vLLM version (or op signature) this patch was not written for.
    """
    version = vllm_version()
    target = _target_for(version)
    if target is None:
        raise RuntimeError(_unsupported(version))
    module = importlib.import_module(target.module)
    if _proxy_in(module) is not None:
        return
    _check_signatures(target, module.ops, version)
    module.ops = target.proxy(module.ops, variant)
    logger.warning("opt4gptq %s serves vLLM %s %s: backend %s, variant %s",
                   opt4gptq.__version__, version, target.serves, opt4gptq.backend(),
                   variant or os.environ.get("OPT4GPTQ_VARIANT") or opt4gptq.default_variant())


def unpatch() -> None:
    """Give vLLM its own GPTQ ops back."""
    for target in _TARGETS:
        module = sys.modules.get(target.module)
        proxy = _proxy_in(module)
        if proxy is not None:
            module.ops = proxy._original


_HOOKED_MODULES = frozenset(t.module for t in _TARGETS)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies patch() right after a vLLM GPTQ module is first imported, so a
    script that imports vLLM later (and vLLM's worker processes) get it too."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _HOOKED_MODULES:
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
    if any(name in sys.modules for name in _HOOKED_MODULES):
        patch()
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def _opted_out() -> bool:
    return os.environ.get(ENV_VAR) == "0"


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point (current vLLM calls it in
    every process it starts, workers included): patch, unless
    ``OPT4GPTQ_PATCH_VLLM=0``. An unsupported vLLM gets a warning, not an
    exception, so that installing opt4gptq never stops vLLM from starting."""
    if _opted_out():
        logger.info("opt4gptq: %s=0, vLLM keeps its own GPTQ kernels", ENV_VAR)
        return
    version = vllm_version()
    if _target_for(version) is None:
        logger.warning("%s vLLM keeps its own GPTQ kernels.", _unsupported(version))
        return
    install_import_hook()


def autopatch_from_environment() -> None:
    """What `OPT4GPTQ_PATCH_VLLM=1` turns on (called at opt4gptq.vllm import)."""
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        install_import_hook()


autopatch_from_environment()
