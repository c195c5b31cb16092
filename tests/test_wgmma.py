"""The Hopper path (sm_90a builds on compute capability 9.0 devices): 4-bit
weights in the tensor-core pack order served by warpgroup MMAs (wgmma), the
default there for use_exllama=True calls of WGMMA_MIN_ROWS (9) rows and more
that name no variant (below, the mma.sync decode kernel is faster). Every block
shape is checked here through path="wgmma", also the ones for fewer rows. Same
spec as every kernel: the float64 reference on fresh data, NaN-poisoned
outputs, repeatable bits, CUDA-graph replays, two streams, and act-order
through activations gathered first."""

import pytest

import opt4gptq
from conftest import (assert_matches_reference, capture_in_graph, exllama_tensors_on_cuda, gpu_skip_reason,
                      make_problem, nan_like_output, run_op, torch_library)


def _hopper_skip_reason():
    reason = gpu_skip_reason()
    if reason is not None:
        return reason
    if opt4gptq.backend() != "cuda":
        return "the wgmma path exists in CUDA builds only"
    import torch

    if torch.cuda.get_device_capability() != (9, 0):
        return f"the wgmma path needs compute capability 9.0 (found {torch.cuda.get_device_capability()})"
    return None


_reason = _hopper_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=_reason or "")]


@pytest.fixture(scope="module")
def cuda():
    return torch_library("cuda")


def check(cuda, problem, path="wgmma"):
    out = run_op(problem, cuda, path=path)
    assert opt4gptq.last_kernel() == "wgmma", problem.describe()
    assert_matches_reference(out, problem)


# Every block shape (8..256 rows), the edges between them, several row tiles.
BATCH_SIZES = [1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129, 200, 256, 257, 300, 1024]


@pytest.mark.parametrize("m", BATCH_SIZES)
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_every_batch_size(cuda, m, act_order):
    check(cuda, make_problem(m=m, k=2048, n=512, bits=4, group_size=128, act_order=act_order, use_exllama=True))


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
@pytest.mark.parametrize("m", [3, 150])
def test_every_format(cuda, m, group_size, act_order, v2):
    check(cuda, make_problem(m=m, k=1024, n=256, bits=4, group_size=group_size, act_order=act_order,
                             use_exllama=True, v2=v2))


# The paper models' layer shapes (K x N), where the plan splits K over 1-8
# cluster blocks depending on how many 128-column tiles fill the GPU.
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 12288), (11008, 4096), (2048, 2048), (5504, 2048),
                                 (2560, 7680), (6912, 2560), (128, 128), (256, 640)])
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_every_layer_shape(cuda, k, n, m):
    check(cuda, make_problem(m=m, k=k, n=n, bits=4, group_size=128 if k % 128 == 0 else 32, act_order=False,
                             use_exllama=True))


@pytest.mark.parametrize("m", [1, 16, 64, 200, 1024])
def test_same_bits_on_every_call(m):
    """No atomics anywhere (cluster blocks add their K ranges in rank order): 20
    identical calls give identical bits, starting from a NaN-poisoned output."""
    import torch

    problem = make_problem(m=m, k=4096, n=2048, bits=4, group_size=128, act_order=True, use_exllama=True)
    args = exllama_tensors_on_cuda(problem)
    out = nan_like_output(problem)
    first = opt4gptq.gptq_gemm(*args, True, 4, out=out, path="wgmma").clone()
    assert opt4gptq.last_kernel() == "wgmma"
    problem.kernel = "wgmma"
    assert_matches_reference(first.cpu().numpy(), problem)
    for _ in range(20):
        assert torch.equal(opt4gptq.gptq_gemm(*args, True, 4, path="wgmma"), first)


@pytest.mark.parametrize("m", [1, 64, 300])
def test_graph_replay_equals_eager(m):
    import torch

    problem = make_problem(m=m, k=2048, n=1024, bits=4, group_size=128, act_order=False, use_exllama=True)
    a, qweight, zeros, scales, _ = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(a, qweight, zeros, scales, None, True, 4, out=nan_like_output(problem),
                               path="wgmma").clone()
    out = nan_like_output(problem)
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(a, qweight, zeros, scales, None, True, 4, out=out,
                                                        path="wgmma"), out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # Fresh activations through the captured graph: the replay really computes.
    fresh = make_problem(m=m, k=2048, n=1024, bits=4, group_size=128, act_order=False, use_exllama=True)
    a.copy_(torch.from_numpy(fresh.a).cuda())
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    problem.a = fresh.a
    problem.__dict__.pop("reference", None)
    problem.__dict__.pop("abs_sum", None)
    problem.kernel = "wgmma"
    assert_matches_reference(out.cpu().numpy(), problem)


def test_two_streams_at_once():
    import torch

    problems = [make_problem(m=m, k=4096, n=2048, bits=4, group_size=128, act_order=False, use_exllama=True)
                for m in (8, 96)]
    tensors = [exllama_tensors_on_cuda(p) for p in problems]
    streams = [torch.cuda.Stream() for _ in problems]
    outs = [nan_like_output(p) for p in problems]
    torch.cuda.synchronize()
    for _ in range(5):
        for (a, q, z, s, _), out, stream in zip(tensors, outs, streams):
            with torch.cuda.stream(stream):
                opt4gptq.gptq_gemm(a, q, z, s, None, True, 4, out=out, path="wgmma")
    torch.cuda.synchronize()
    for problem, out in zip(problems, outs):
        problem.kernel = "wgmma"
        assert_matches_reference(out.cpu().numpy(), problem)


def test_forced_wgmma_refuses_what_it_cannot_read(cuda):
    problem = make_problem(m=4, k=1024, n=192, bits=4, group_size=128, act_order=False, use_exllama=True)
    with pytest.raises(ValueError, match="path='wgmma' needs"):
        run_op(problem, cuda, path="wgmma")  # N = 192 is not a multiple of 128
    # The default path still serves that layer, with another kernel.
    out = run_op(problem, cuda, path=None)
    assert problem.kernel != "wgmma"
    assert_matches_reference(out, problem)


@pytest.mark.parametrize("m", [1, 8, 9, 16, 17, 64, 1024])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
def test_the_default_takes_wgmma_from_nine_rows(cuda, m, act_order):
    problem = make_problem(m=m, k=1024, n=256, bits=4, group_size=128, act_order=act_order, use_exllama=True)
    out = run_op(problem, cuda, path=None)
    assert problem.kernel == ("wgmma" if m >= 9 else "mma"), problem.describe()
    assert_matches_reference(out, problem)
