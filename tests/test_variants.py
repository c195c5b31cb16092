"""Every Opt4GPTQ variant on the GPU: right answers on every axis, and the
properties each one claims (SMB: no atomics, so bitwise repeatable)."""

import functools

import pytest

import opt4gptq
from conftest import (DETERMINISTIC_VARIANTS as DETERMINISTIC, HALF_REL_TOL, assert_matches_reference, capture_in_graph,
                      exllama_gamma, exllama_tensors_on_cuda, gpu_skip_reason, make_problem, run_op, torch_library)

_reason = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

VARIANTS = opt4gptq.variants()


def gamma_of(variant: str, k: int) -> float:
    return exllama_gamma(variant, k)


@pytest.fixture(scope="module")
def cuda():
    return torch_library("cuda")


@functools.lru_cache(maxsize=None)
def shared_problem(m, k, n, bits, group_size, act_order):
    """One fresh problem per shape per session, reused by all five variants."""
    return make_problem(m=m, k=k, n=n, bits=bits, group_size=group_size, act_order=act_order, use_exllama=True)


def check_variant(cuda, problem, variant):
    exllama = problem.a.shape[0] <= 50
    out = run_op(problem, cuda, path="exllama" if exllama else None)
    if exllama:
        assert opt4gptq.last_kernel() == f"exllama/{variant}"
    assert_matches_reference(out, problem, rel_tol=HALF_REL_TOL,
                             gamma=gamma_of(variant, problem.t.k) if exllama else None)


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    monkeypatch.setenv("OPT4GPTQ_VARIANT", request.param)
    return request.param


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_format(cuda, variant, bits, group_size, act_order):
    check_variant(cuda, shared_problem(5, 4096, 4096, bits, group_size, act_order), variant)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 16, 33, 50, 51, 64, 300, 1024])
def test_every_batch_size(cuda, variant, m):
    check_variant(cuda, shared_problem(m, 4096, 4096, 4, 128, True), variant)


@pytest.mark.parametrize("n", [4096, 5120])
@pytest.mark.parametrize("k", [128, 4096, 11008, 13824])
def test_every_layer_shape(cuda, variant, k, n):
    check_variant(cuda, shared_problem(8, k, n, 4, 128 if k % 128 == 0 else 32, True), variant)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 7, 33])
def test_twenty_calls(variant, bits, m):
    """SMB variants are bitwise repeatable; split-K variants (like vLLM's kernel)
    add fp16 atomics in arrival order, so each call is checked for accuracy instead."""
    import torch

    if bits == 8 and m > 24:
        pytest.skip("8-bit uses the exllama family up to 24 rows")
    problem = shared_problem(m, 4096, 2048, bits, 128, True)
    args = exllama_tensors_on_cuda(problem)
    first = opt4gptq.gptq_gemm(*args, True, bits, path="exllama").clone()
    assert_matches_reference(first.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))
    for _ in range(20):
        again = opt4gptq.gptq_gemm(*args, True, bits, path="exllama")
        if variant in DETERMINISTIC:
            assert torch.equal(again, first)
        else:
            assert_matches_reference(again.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))


@pytest.mark.parametrize("m", [1, 8, 33])
def test_cuda_graph(variant, m):
    import torch

    problem = shared_problem(m, 4096, 2048, 4, 128, True)
    t = problem.t
    a, qweight, zeros, scales, perm = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4).clone()
    out = torch.empty((m, t.n), dtype=torch.float16, device="cuda")
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4, out=out), out)
    for _ in range(3):  # the captured memset re-zeroes the output for split-K variants
        graph.replay()
    torch.cuda.synchronize()
    if variant in DETERMINISTIC:
        assert torch.equal(out, eager)
    assert_matches_reference(out.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))


def test_two_streams(variant):
    import torch

    problems = [shared_problem(m, 4096, 4096, 4, 128, False) for m in (1, 33)]
    streams = [torch.cuda.Stream() for _ in problems]
    outs = []
    for problem, stream in zip(problems, streams):
        t = problem.t
        with torch.cuda.stream(stream):
            args = [torch.from_numpy(x).cuda() for x in (problem.a, t.qweight, t.qzeros, t.scales)]
            outs.append([opt4gptq.gptq_gemm(*args, None, True, 4) for _ in range(5)][-1])
    torch.cuda.synchronize()
    for problem, out in zip(problems, outs):
        assert_matches_reference(out.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))


def test_unknown_variant_is_refused(cuda, monkeypatch):
    monkeypatch.setenv("OPT4GPTQ_VARIANT", "turbo")
    problem = shared_problem(1, 128, 256, 4, 32, False)
    with pytest.raises(ValueError, match="variant must be one of"):
        run_op(problem, cuda)
