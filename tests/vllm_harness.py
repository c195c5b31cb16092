"""Loads vLLM 0.3.3's real GPTQ layer source without the rest of vLLM.

The wheel comes from PyPI once (cached); only its .py files are used. vLLM's
compiled `_C` is replaced by a stand-in that fails loudly if any op is reached,
so a test passes only if opt4gptq served every call. Two light modules are
stubbed because importing them drags in all of vLLM: the top-level `vllm`
package (engine, Ray, transformers) and `vllm.model_executor.utils` (of which
the GPTQ layer needs one setattr helper).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Iterable, Optional

VLLM_VERSION = "0.3.3"
GPTQ_MODULE = "vllm.model_executor.layers.quantization.gptq"


def cache_root() -> Path:
    """Where extracted vLLM sources live: $OPT4GPTQ_VLLM_CACHE (a carried copy on
    machines without network), else ~/.cache/opt4gptq."""
    root = os.environ.get("OPT4GPTQ_VLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opt4gptq")
    return Path(root)


def cache_dir() -> Path:
    return cache_root() / f"vllm-{VLLM_VERSION}"


def fetch_wheel_sources(version: str, names: Optional[Iterable[str]] = None) -> Path:
    """The extracted source tree of vLLM `version`: every vllm/*.py, or only
    `names`. Downloads the wheel from PyPI once (into a temporary folder: current
    wheels are hundreds of MB, of which only these files are used)."""
    source = cache_root() / f"vllm-{version}" / "src"
    wanted = set(names) if names is not None else None
    if wanted is not None and all((source / name).exists() for name in wanted):
        return source
    with tempfile.TemporaryDirectory(prefix="opt4gptq-vllm-") as download:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={version}",
                              "-d", download], capture_output=True, text=True, timeout=900)
        if pip.returncode != 0:
            reason = (pip.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"pip download vllm=={version} failed: {reason}")
        wheel = next(Path(download).glob(f"vllm-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith("vllm/") and name.endswith(".py") and (wanted is None or name in wanted):
                    archive.extract(name, source)
    missing = sorted(n for n in wanted or () if not (source / n).exists())
    if missing:
        raise FileNotFoundError(f"vLLM {version}'s wheel lacks {missing}")
    return source


def fetch_source() -> Path:
    """vLLM 0.3.3's extracted vllm/ source tree; downloads the wheel on first use."""
    source = cache_dir() / "src"
    if (source / "vllm" / "model_executor" / "layers" / "quantization" / "gptq.py").exists():
        return source
    return fetch_wheel_sources(VLLM_VERSION)


class CompiledOpsGuard:
    """vLLM's compiled ops: any use means opt4gptq did not serve the call."""

    def __init__(self):
        self.reached = []

    def __getattr__(self, name):
        raise AssertionError(f"vLLM's own compiled op `{name}` was reached")


def install(source: Path) -> types.ModuleType:
    """Makes vLLM 0.3.3's GPTQ module importable; returns it (not yet patched)."""
    def package(name: str, path: Path) -> None:
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module

    root = source / "vllm"
    package("vllm", root)
    sys.modules["vllm"].__version__ = VLLM_VERSION
    package("vllm.model_executor", root / "model_executor")
    compiled = types.ModuleType("vllm._C")
    compiled.ops, compiled.cache_ops, compiled.custom_ar = CompiledOpsGuard(), CompiledOpsGuard(), CompiledOpsGuard()
    sys.modules["vllm._C"] = compiled
    utils = types.ModuleType("vllm.model_executor.utils")

    def set_weight_attrs(weight, attrs):
        for key, value in (attrs or {}).items():
            setattr(weight, key, value)

    utils.set_weight_attrs = set_weight_attrs
    sys.modules["vllm.model_executor.utils"] = utils
    return importlib.import_module(GPTQ_MODULE)


def uninstall() -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
