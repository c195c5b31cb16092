"""Every Opt4GPTQ variant on the GPU: right answers on every axis, and the
same bits on every call, in CUDA graphs and on concurrent streams. No variant
uses atomics: SMB meets its K slices in shared memory, the split-K variants
(baseline, vml, ila) store each K block's shares in its own workspace slice and
add the slices in order, so the order the blocks finish in cannot show."""

import functools

import pytest

import opt4gptq
from conftest import (HALF_REL_TOL, SPLIT_K_VARIANTS, assert_matches_reference, capture_in_graph, exllama_gamma,
                      exllama_tensors_on_cuda, gpu_skip_reason, make_problem, run_op, torch_library)

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
    """Every variant is bitwise repeatable, split-K ones included."""
    import torch

    if bits == 8 and m > 24:
        pytest.skip("8-bit uses the exllama family up to 24 rows")
    problem = shared_problem(m, 4096, 2048, bits, 128, True)
    args = exllama_tensors_on_cuda(problem)
    first = opt4gptq.gptq_gemm(*args, True, bits, path="exllama").clone()
    assert opt4gptq.last_kernel() == f"exllama/{variant}"
    assert_matches_reference(first.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))
    for _ in range(20):
        again = opt4gptq.gptq_gemm(*args, True, bits, path="exllama")
        assert torch.equal(again, first)


@pytest.mark.parametrize("m", [1, 8, 33])
def test_cuda_graph(variant, m):
    import torch

    problem = shared_problem(m, 4096, 2048, 4, 128, True)
    t = problem.t
    a, qweight, zeros, scales, perm = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4).clone()
    out = torch.empty((m, t.n), dtype=torch.float16, device="cuda")
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4, out=out), out)
    for _ in range(3):  # split-K variants: every replay rewrites each workspace slice before summing
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert_matches_reference(out.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))


def test_two_streams(variant):
    """Two streams running the variant at once, launches interleaved: each call
    gets its own workspace from torch's stream-ordered allocator, so both
    streams' results are right and equal to eager calls', bit for bit."""
    import torch

    problems = [shared_problem(m, 4096, 4096, 4, 128, False) for m in (1, 16)]
    inputs = [list(exllama_tensors_on_cuda(p)[:4]) for p in problems]
    eager = []
    for args in inputs:
        eager.append(opt4gptq.gptq_gemm(*args, None, True, 4).clone())
        assert opt4gptq.last_kernel() == f"exllama/{variant}"
    streams = [torch.cuda.Stream() for _ in problems]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    outs = [[] for _ in problems]
    for _ in range(5):
        for args, stream, results in zip(inputs, streams, outs):
            with torch.cuda.stream(stream):
                results.append(opt4gptq.gptq_gemm(*args, None, True, 4))
    torch.cuda.synchronize()
    for problem, first, results in zip(problems, eager, outs):
        for out in results:
            assert torch.equal(out, first)
        assert_matches_reference(first.cpu().numpy(), problem, rel_tol=HALF_REL_TOL, gamma=gamma_of(variant, 4096))


def engine_gemm(problem, variant, workspace):
    """The engine's own entry (opt4gptq._C.gemm), which takes the split-K
    workspace that gptq_gemm allocates; returns (kernel, out)."""
    import torch
    from opt4gptq import _C
    from opt4gptq._frameworks import capsule, launch_for

    t = problem.t
    a, qweight, zeros, scales, _ = exllama_tensors_on_cuda(problem)
    out = torch.full((problem.a.shape[0], t.n), float("nan"), dtype=torch.float16, device="cuda")
    launch = launch_for(a)
    kernel = _C.gemm(*(capsule(x, launch) for x in (a, qweight, zeros, scales)), None, capsule(out, launch), True, 4,
                     False, "exllama", variant, launch.stream, None if workspace is None else capsule(workspace, launch))
    return kernel, out


@pytest.mark.parametrize("split_k", SPLIT_K_VARIANTS)
def test_split_k_needs_its_workspace(split_k):
    import torch

    problem = shared_problem(3, 1024, 512, 4, 128, False)  # 8 K blocks of 128 rows
    with pytest.raises(ValueError, match=r"stores its K blocks' shares in a float16 \[K blocks, M, N\] workspace, and none"):
        engine_gemm(problem, split_k, None)
    with pytest.raises(TypeError, match="workspace must be float16; got int64"):
        engine_gemm(problem, split_k, torch.zeros((8, 3, 512), dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match=r"workspace has 12287 elements; .* \[8, 3, 512\]"):
        engine_gemm(problem, split_k, torch.zeros(12287, dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError, match="workspace is on cpu but a is on cuda:0"):
        engine_gemm(problem, split_k, torch.zeros((8, 3, 512), dtype=torch.float16))
    # Any contiguous float16 buffer with room for the slices will do; its old contents (NaN here) do not matter.
    kernel, out = engine_gemm(problem, split_k, torch.full((13000,), float("nan"), dtype=torch.float16, device="cuda"))
    torch.cuda.synchronize()
    assert kernel == f"exllama/{split_k}"
    problem.kernel = kernel
    assert_matches_reference(out.cpu().numpy(), problem)


def test_unknown_variant_is_refused(cuda, monkeypatch):
    monkeypatch.setenv("OPT4GPTQ_VARIANT", "turbo")
    problem = shared_problem(1, 128, 256, 4, 32, False)
    with pytest.raises(ValueError, match="variant must be one of"):
        run_op(problem, cuda)
