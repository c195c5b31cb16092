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
import types
import zipfile
from pathlib import Path

VLLM_VERSION = "0.3.3"
GPTQ_MODULE = "vllm.model_executor.layers.quantization.gptq"


def cache_dir() -> Path:
    root = os.environ.get("OPT4GPTQ_VLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "opt4gptq")
    return Path(root) / f"vllm-{VLLM_VERSION}"


def fetch_source() -> Path:
    """The extracted vllm/ source tree; downloads the wheel on first use."""
    target = cache_dir()
    source = target / "src"
    if (source / "vllm" / "model_executor" / "layers" / "quantization" / "gptq.py").exists():
        return source
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={VLLM_VERSION}",
                    "-d", str(target)], check=True, capture_output=True, timeout=600)
    wheel = next(target.glob(f"vllm-{VLLM_VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                archive.extract(name, source)
    return source


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
