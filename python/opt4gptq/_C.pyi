# Stub of the native engine. The public API is opt4gptq.gptq_gemm / gptq_shuffle;
# these take DLPack capsules made by opt4gptq._frameworks.
from typing import Any, List, Optional, Tuple

__version__: str
SKINNY_MAX_ROWS: int

def gemm(
    a: Any,
    b_q_weight: Any,
    b_gptq_qzeros: Any,
    b_gptq_scales: Any,
    b_g_idx: Optional[Any],
    out: Any,
    use_exllama: bool,
    bit: int,
    use_v2_format: bool,
    path: Optional[str],
    variant: Optional[str],
    stream: int,
    workspace: Optional[Any] = None,
) -> str: ...
def dequantize(
    a: Any,
    b_q_weight: Any,
    b_gptq_qzeros: Any,
    b_gptq_scales: Any,
    b_g_idx: Optional[Any],
    weights: Any,
    use_exllama: bool,
    bit: int,
    use_v2_format: bool,
    stream: int,
) -> None: ...
def split_k_workspace(
    m: int, k: int, n: int, bit: int, use_exllama: bool, path: Optional[str], variant: Optional[str]
) -> Optional[Tuple[int, int, int]]: ...
def dense_min_rows(bit: int, use_exllama: bool, variant_named: bool = False, device: Optional[int] = None,
                   n: int = 0, k: int = 0) -> int: ...
def permute_rows(src: Any, dst: Any, perm: Optional[Any], bit: int, stream: int) -> None: ...
def backend() -> str: ...
def variants() -> List[str]: ...
def default_variant() -> str: ...
def devices() -> List[str]: ...
def stream_synchronize(device: int, stream: int) -> None: ...
