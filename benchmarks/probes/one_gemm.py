"""One 4-bit exllama-layout GEMM call on random data, repeated, for ncu/nsys.

    python one_gemm.py K N M [calls]      (OPT4GPTQ_MMA_TUNING picks the mma kernel)
"""
import sys

import torch

import opt4gptq

k, n, m = (int(x) for x in sys.argv[1:4])
calls = int(sys.argv[4]) if len(sys.argv) > 4 else 3
gen = torch.Generator(device="cuda").manual_seed(0)
qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda", generator=gen)
qzeros = torch.randint(-2**31, 2**31 - 1, (k // 128, n // 8), dtype=torch.int32, device="cuda", generator=gen)
scales = (torch.rand((k // 128, n), device="cuda", generator=gen) * 0.01 + 0.001).half()
a = torch.randn((m, k), device="cuda", generator=gen).half()
for _ in range(calls):
    out = opt4gptq.gptq_gemm(a, qweight, qzeros, scales, None, True, 4, path="mma")
torch.cuda.synchronize()
print(opt4gptq.last_kernel(), out.shape, float(out.float().abs().mean()))
