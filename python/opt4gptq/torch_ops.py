"""opt4gptq's ops as torch custom operators, so torch.compile and CUDA graphs
see proper ops: ``torch.ops.opt4gptq.gptq_gemm`` and ``torch.ops.opt4gptq.gptq_shuffle``,
with current vLLM's argument order (``use_v2_format`` before ``bit``).

Importing this module registers them on torch >= 2.4 (``torch.library.custom_op``);
``REGISTERED`` says whether it did. On older torch (vLLM 0.3.3 pins 2.1.2) use
``opt4gptq.gptq_gemm`` directly: it works there through DLPack's legacy capsules.

Pass an empty tensor, not a meta tensor, for "no g_idx": a meta argument would
route the whole op to its fake implementation.
"""

from __future__ import annotations

import torch

from . import ops as _ops

REGISTERED = hasattr(torch.library, "custom_op")

if REGISTERED:

    @torch.library.custom_op("opt4gptq::gptq_gemm", mutates_args=())
    def gptq_gemm(a: torch.Tensor, b_q_weight: torch.Tensor, b_gptq_qzeros: torch.Tensor,
                  b_gptq_scales: torch.Tensor, b_g_idx: torch.Tensor, use_exllama: bool, use_v2_format: bool,
                  bit: int) -> torch.Tensor:
        return _ops.gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, bit, use_v2_format)

    @gptq_gemm.register_fake
    def _gptq_gemm_fake(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, use_v2_format, bit):
        return a.new_empty((a.shape[0], b_q_weight.shape[1]))

    @torch.library.custom_op("opt4gptq::gptq_shuffle", mutates_args=("q_weight",))
    def gptq_shuffle(q_weight: torch.Tensor, q_perm: torch.Tensor, bit: int) -> None:
        _ops.gptq_shuffle(q_weight, q_perm, bit)

    @gptq_shuffle.register_fake
    def _gptq_shuffle_fake(q_weight, q_perm, bit):
        return None
