"""``opt4gptq::vllm_gptq_gemm``: what current vLLM's patched ``gptq_gemm`` calls.

vLLM compiles its models with ``torch.compile(fullgraph=True)``: Dynamo may not
break the graph, so the call must be a single op it does not look into, with a
fake implementation for tracing. The layout check lives inside the op for the
same reason. Imported only when current vLLM is patched (needs torch >= 2.4).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops as _ops
from . import _CURRENT_WHEN, _require_our_storage


@torch.library.custom_op("opt4gptq::vllm_gptq_gemm", mutates_args=())
def vllm_gptq_gemm(a: torch.Tensor, b_q_weight: torch.Tensor, b_gptq_qzeros: torch.Tensor,
                   b_gptq_scales: torch.Tensor, use_exllama: bool, use_v2_format: bool, bit: int,
                   variant: Optional[str]) -> torch.Tensor:
    if use_exllama:
        _require_our_storage(b_q_weight, _CURRENT_WHEN)
    return _ops.gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, None, use_exllama, bit, use_v2_format,
                          variant=variant)


@vllm_gptq_gemm.register_fake
def _vllm_gptq_gemm_fake(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, use_exllama, use_v2_format, bit, variant):
    return a.new_empty((a.shape[0], b_q_weight.shape[1]))
