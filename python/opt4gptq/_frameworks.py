"""What opt4gptq needs to know about the caller's array library.

The engine speaks DLPack only. This module turns numpy / torch / CuPy / other
array-API objects into capsules made with the right stream, allocates outputs
and scratch with the caller's own library (so CUDA-graph capture and memory
pools keep working), and names the stream our kernels must launch on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

# DLPack device types (dlpack.h).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_ROCM, _DL_ROCM_HOST = 1, 2, 3, 10, 11


def library_of(x: Any) -> str:
    """'numpy', 'torch', 'cupy' or 'other' (any DLPack / array-API producer)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    root = type(x).__module__.split(".", 1)[0]
    if root == "torch" and "torch" in sys.modules:
        return "torch"
    if root == "cupy":
        return "cupy"
    return "other"


def is_absent(x: Any) -> bool:
    """None, an empty array, or a torch meta tensor all mean "no index tensor".

    vLLM 0.3.3 passes a (1, 1) tensor on the meta device for layers without
    act-order; current vLLM passes an empty (0,) tensor. Neither has data.
    """
    if x is None:
        return True
    if library_of(x) == "torch" and x.device.type == "meta":
        return True
    shape = getattr(x, "shape", None)
    return shape is not None and 0 in tuple(shape)


def dlpack_device(x: Any) -> Tuple[int, int]:
    if library_of(x) == "numpy":
        return (_DL_CPU, 0)
    try:
        kind, index = x.__dlpack_device__()
    except AttributeError:
        raise TypeError(f"expected a numpy/torch/CuPy array or another DLPack producer; got {type(x).__name__}") from None
    return (int(kind), int(index))


def is_gpu(x: Any) -> bool:
    return dlpack_device(x)[0] in (_DL_CUDA, _DL_ROCM)


@dataclass(frozen=True)
class Launch:
    """Where the kernels run: the stream handle, and what to tell producers."""

    stream: int  # cudaStream_t / hipStream_t as an integer; 0 = default stream
    dlpack_stream: Optional[int]  # argument for __dlpack__(stream=...); None on the CPU
    synchronize_after: bool  # producers we cannot share a stream with get a finished result


def launch_for(x: Any) -> Launch:
    """The stream the caller's library is working on for array `x`."""
    kind, _ = dlpack_device(x)
    if kind not in (_DL_CUDA, _DL_ROCM):
        return Launch(stream=0, dlpack_stream=None, synchronize_after=False)
    library = library_of(x)
    if library == "torch":
        import torch

        # -1: "do not synchronize". We launch on torch's current stream, where
        # torch already orders its work, and a sync edge would break capture.
        return Launch(stream=torch.cuda.current_stream(x.device).cuda_stream, dlpack_stream=-1, synchronize_after=False)
    default_stream = 0 if kind == _DL_ROCM else 1  # DLPack's name for the legacy default stream
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(x.device.id):
            pointer = cupy.cuda.get_current_stream().ptr
        return Launch(stream=pointer, dlpack_stream=pointer or default_stream, synchronize_after=False)
    # Unknown producers (JAX, ...) cannot tell us their stream: use the default
    # stream and hand back a finished result.
    return Launch(stream=0, dlpack_stream=default_stream, synchronize_after=True)


def capsule(x: Any, launch: Launch) -> Any:
    """A DLPack capsule of `x` whose data is ready on `launch.stream`."""
    library = library_of(x)
    if library == "torch":
        if x.requires_grad:
            x = x.detach()
        if x.device.type == "cpu":
            return x.__dlpack__()
        return x.__dlpack__(stream=launch.dlpack_stream)
    if library == "numpy":
        if not x.flags.writeable:
            # Legacy capsules cannot say "read-only", so numpy refuses them; ask for a versioned one.
            return x.__dlpack__(max_version=(1, 0))
        return x.__dlpack__()
    if launch.dlpack_stream is None:
        return x.__dlpack__()
    return x.__dlpack__(stream=launch.dlpack_stream)


def empty_like(x: Any, shape: Tuple[int, ...], dtype: str) -> Any:
    """An uninitialized array of `shape` and `dtype` ('float16', 'int32') from x's library, on x's device."""
    library = library_of(x)
    if library == "numpy":
        return np.empty(shape, dtype=dtype)
    if library == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=x.device)
    if library == "cupy":
        import cupy

        with cupy.cuda.Device(x.device.id):
            return cupy.empty(shape, dtype=dtype)
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is None:
        raise TypeError(f"cannot allocate an output like {type(x).__name__}; pass out=")
    xp = namespace()
    return xp.empty(shape, dtype=getattr(xp, dtype), device=x.device)


def copy_of(x: Any) -> Any:
    """A new array with x's contents, from x's library (ordered on its stream)."""
    library = library_of(x)
    if library == "torch":
        return x.clone()
    if library in ("numpy", "cupy"):
        return x.copy()
    namespace = getattr(x, "__array_namespace__", None)
    if namespace is None:
        raise TypeError(f"cannot copy a {type(x).__name__}")
    return namespace().asarray(x, copy=True)


def shape_of(x: Any, name: str) -> Tuple[int, ...]:
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name} must be an array (numpy, torch, CuPy or another DLPack producer); got {type(x).__name__}")
    return tuple(int(s) for s in shape)
