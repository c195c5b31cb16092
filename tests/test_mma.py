"""The tensor-core path (CUDA builds, sm_80+): 4-bit weights in the exllama layout
served by mma.sync, the default for 4-bit use_exllama=True calls up to
MMA_MAX_ROWS rows when no variant is named. Same spec as every kernel: the
float64 reference on fresh data, NaN-poisoned outputs, repeatable bits,
CUDA-graph replays, and act-order through the activation permutation."""

import pytest

import opt4gptq
from conftest import (assert_matches_reference, capture_in_graph, exllama_tensors_on_cuda, gpu_skip_reason, make_problem,
                      nan_like_output, run_op, torch_library)

_reason = gpu_skip_reason() or (None if opt4gptq.backend() == "cuda" else "the mma path exists in CUDA builds only")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


@pytest.fixture(scope="module")
def cuda():
    return torch_library("cuda")


# The kernels and block shapes behind path="mma" (csrc/gptq/instances/mma_b4.cu
# picks one per call; OPT4GPTQ_MMA_TUNING forces one): the K-slice kernel with
# K-slice warps on one 32-column strip or 2-4 column warps side by side, and the
# tiled kernel (64 x 128 tiles; K also split over 1-8 cluster blocks on Hopper).
MMA_KERNELS = {
    "auto": None,
    "tiled": "kernel=tiled",
    "tiled-split1": "kernel=tiled,split=1",
    "tiled-split8": "kernel=tiled,split=8",
    "tiled-packs1": "kernel=tiled,packs=1",
    "tiled-packs1-split3": "kernel=tiled,packs=1,split=3",
    "c32w16": "cols=32,warps=16",
    "c32w4": "cols=32,warps=4",
    "c64w16": "cols=64,warps=16",
    "c64w8": "cols=64,warps=8",
    "c128w16": "cols=128,warps=16",
    "c128w4": "cols=128,warps=4",
}


@pytest.fixture(params=list(MMA_KERNELS))
def mma_kernel(request, monkeypatch):
    tuning = MMA_KERNELS[request.param]
    if tuning is None:
        monkeypatch.delenv("OPT4GPTQ_MMA_TUNING", raising=False)
    else:
        monkeypatch.setenv("OPT4GPTQ_MMA_TUNING", tuning)
    return request.param


def check(cuda, problem, path="mma"):
    out = run_op(problem, cuda, path=path)
    assert opt4gptq.last_kernel() == "mma"
    assert_matches_reference(out, problem)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_every_format(mma_kernel, cuda, group_size, act_order, v2):
    check(cuda, make_problem(m=5, k=1024, n=256, bits=4, group_size=group_size, act_order=act_order,
                             use_exllama=True, v2=v2))


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 33, 50, 60, 64, 65, 100, 150, 192, 300])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_every_batch_size(mma_kernel, cuda, m, act_order):
    check(cuda, make_problem(m=m, k=4096, n=512, bits=4, group_size=128, act_order=act_order, use_exllama=True))


@pytest.mark.parametrize("n", [32, 96, 4096, 5120])
@pytest.mark.parametrize("k", [32, 128, 4096, 11008, 13824])
def test_every_layer_shape(mma_kernel, cuda, k, n):
    # K=32 is one pack: most of the 16 K-slice warps of a block get nothing to do.
    group = 128 if k % 128 == 0 else 32
    check(cuda, make_problem(m=3, k=k, n=n, bits=4, group_size=group, act_order=k > 32, use_exllama=True))


@pytest.mark.parametrize("m", [1, 8, 16])
def test_is_the_default_for_4bit_exllama_calls(cuda, m, monkeypatch):
    # On Hopper the wgmma family takes over from 9 rows (tests/test_wgmma.py); below, and elsewhere, mma.
    import torch

    monkeypatch.delenv("OPT4GPTQ_VARIANT", raising=False)
    problem = make_problem(m=m, k=512, n=256, bits=4, group_size=128, act_order=True, use_exllama=True)
    hopper = torch.cuda.get_device_capability() == (9, 0)  # the default build carries sm_90a
    out = run_op(problem, cuda)
    assert opt4gptq.last_kernel() == ("wgmma" if hopper and m >= 9 else "mma")
    assert_matches_reference(out, problem)


def test_a_named_variant_gets_the_exllama_family(cuda, monkeypatch):
    monkeypatch.setenv("OPT4GPTQ_VARIANT", "baseline")
    problem = make_problem(m=4, k=512, n=256, bits=4, group_size=128, act_order=False, use_exllama=True)
    out = run_op(problem, cuda)
    assert opt4gptq.last_kernel() == "exllama/baseline"
    assert_matches_reference(out, problem)


def test_unaligned_activations_take_the_gather_loads(mma_kernel, cuda):
    import torch

    problem = make_problem(m=6, k=1024, n=256, bits=4, group_size=128, act_order=False, use_exllama=True)
    # A column slice: row stride k + 8 halves, base pointer 2 bytes past an allocation boundary.
    wide = torch.zeros((6, 1024 + 9), dtype=torch.float16, device="cuda")
    wide[:, 1:1025] = torch.from_numpy(problem.a).cuda()
    a = wide[:, 1:1025]
    out = torch.full((6, 256), float("nan"), dtype=torch.float16, device="cuda")
    _, qweight, qzeros, scales, _ = exllama_tensors_on_cuda(problem)
    opt4gptq.gptq_gemm(a, qweight, qzeros, scales, None, True, 4, out=out, path="mma")
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(out.cpu().numpy(), problem)


@pytest.mark.parametrize("m", [1, 7, 16, 33, 64])
def test_twenty_calls_are_bitwise_identical(mma_kernel, m):
    import torch

    problem = make_problem(m=m, k=4096, n=2048, bits=4, group_size=128, act_order=True, use_exllama=True)
    args = exllama_tensors_on_cuda(problem)
    first = opt4gptq.gptq_gemm(*args, True, 4, out=nan_like_output(problem), path="mma").clone()
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(first.cpu().numpy(), problem)
    for _ in range(20):
        assert torch.equal(opt4gptq.gptq_gemm(*args, True, 4, path="mma"), first)


@pytest.mark.parametrize("m", [1, 16, 40])
def test_cuda_graph_replay_equals_eager(mma_kernel, m):
    import torch

    problem = make_problem(m=m, k=2048, n=1024, bits=4, group_size=128, act_order=False, use_exllama=True)
    a, qweight, zeros, scales, _ = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(a, qweight, zeros, scales, None, True, 4, out=nan_like_output(problem), path="mma")
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(eager.cpu().numpy(), problem)
    out = nan_like_output(problem)
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(a, qweight, zeros, scales, None, True, 4, out=out,
                                                        path="mma"), out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_refuses_what_it_cannot_serve(cuda):
    problem = make_problem(m=2, k=256, n=256, bits=8, group_size=128, act_order=False, use_exllama=True)
    with pytest.raises(ValueError, match="path='mma' needs bit=4"):
        run_op(problem, cuda, path="mma")
    problem = make_problem(m=2, k=256, n=80, bits=4, group_size=128, act_order=False, use_exllama=True)
    with pytest.raises(ValueError, match="N a multiple of 32"):
        run_op(problem, cuda, path="mma")


@pytest.mark.parametrize("m", [1, 12])
def test_act_order_from_cupy_gathers_inside_the_kernel(mma_kernel, m):
    """torch callers get their activations permuted by torch first; other
    producers (CuPy here) take the kernel's own gather through the permutation."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    problem = make_problem(m=m, k=2048, n=256, bits=4, group_size=128, act_order=True, use_exllama=True)
    t = problem.t
    perm = cupy.asarray(problem.perm)
    qweight = cupy.asarray(t.qweight)
    opt4gptq.gptq_shuffle(qweight, perm, 4)
    out = cupy.full((m, t.n), cupy.nan, dtype=cupy.float16)
    opt4gptq.gptq_gemm(cupy.asarray(problem.a), qweight, cupy.asarray(t.qzeros), cupy.asarray(t.scales), perm,
                       True, 4, out=out, path="mma")
    problem.kernel = opt4gptq.last_kernel()
    assert problem.kernel == "mma"
    assert_matches_reference(cupy.asnumpy(out), problem)
