"""Runs in child processes of test_vllm.py: one vLLM GPTQ layer, served or not."""

import numpy as np


def serve_one_layer(gptq) -> bool:
    """True when vLLM's layer ran through opt4gptq and matched the reference."""
    import torch

    import opt4gptq
    from opt4gptq import pack

    t = pack.random_gptq(256, 64, 4, 128, act_order=True, rng=0)
    method = gptq.GPTQLinearMethod(gptq.GPTQConfig(4, 128, True))
    weights = method.create_weights(256, 64, 256, 64, torch.float16)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        weights[name].data.copy_(torch.from_numpy(getattr(t, name)))
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float16)
    try:
        out = method.apply_weights(weights, torch.from_numpy(x)).numpy().astype(np.float64)
    except AssertionError:  # vLLM's own op was reached: not patched
        return False
    ref = pack.reference_gemm(x, t.qweight, t.qzeros, t.scales, t.g_idx, 4)
    return opt4gptq.last_kernel() == "cpu" and np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-3


def child_report() -> str:
    import vllm_harness

    gptq = vllm_harness.install(vllm_harness.fetch_source())
    import opt4gptq.vllm

    return f"patched {opt4gptq.vllm.is_patched()} served {serve_one_layer(gptq)}"
