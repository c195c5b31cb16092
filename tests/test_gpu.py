"""The GPU kernels against the float64 reference, through torch and CuPy, plus the
properties vLLM relies on: bitwise repeatability, CUDA-graph capture, streams."""

import numpy as np
import pytest

import opt4gptq
from conftest import (Problem, assert_matches_reference, capture_in_graph, exllama_tensors_on_cuda, gpu_skip_reason,
                      make_problem, run_op, torch_library)

_reason = gpu_skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_reason is not None, reason=_reason or "")]

BITS = [2, 3, 4, 8]
PATHS = ["skinny", "tiled"]


@pytest.fixture(scope="module")
def cuda():
    return torch_library("cuda")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", BITS)
def test_every_format(cuda, bits, group_size, act_order, use_exllama, v2, path):
    problem = make_problem(m=9, k=384, n=256, bits=bits, group_size=group_size,
                           act_order=act_order, use_exllama=use_exllama, v2=v2)
    assert_matches_reference(run_op(problem, cuda, path=path), problem)


@pytest.mark.parametrize("m", [0, 1, 7, 8, 9, 16, 17, 50, 51, 300, 8192])
@pytest.mark.parametrize("bits", BITS)
def test_every_batch_size(cuda, bits, m):
    problem = make_problem(m=m, k=4096, n=320, bits=bits, group_size=128, act_order=True, use_exllama=True)
    assert_matches_reference(run_op(problem, cuda), problem)


@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("k", [128, 384, 4096, 11008])
@pytest.mark.parametrize("bits", BITS)
def test_every_depth(cuda, bits, k, use_exllama):
    problem = make_problem(m=3, k=k, n=256, bits=bits, group_size=32 if k == 11008 else 128,
                           act_order=True, use_exllama=use_exllama)
    assert_matches_reference(run_op(problem, cuda), problem)


@pytest.mark.parametrize("m", [1, 8, 64, 1024])
def test_llama_sized_layer(cuda, m):
    problem = make_problem(m=m, k=4096, n=4096, bits=4, group_size=128, act_order=True, use_exllama=True)
    assert_matches_reference(run_op(problem, cuda), problem)


@pytest.mark.parametrize("n", [8, 40, 72])
def test_narrow_outputs_that_do_not_fill_a_block(cuda, n):
    problem = make_problem(m=5, k=256, n=n, bits=4, group_size=64, act_order=True, use_exllama=False)
    for path in PATHS:
        assert_matches_reference(run_op(problem, cuda, path=path), problem)


@pytest.mark.parametrize("m", [1, 7, 16, 51, 300])
def test_twenty_calls_are_bitwise_identical(m):
    import torch

    problem = make_problem(m=m, k=4096, n=1024, bits=4, group_size=128, act_order=True, use_exllama=False)
    t = problem.t
    args = [torch.from_numpy(x).cuda() for x in (problem.a, t.qweight, t.qzeros, t.scales, t.g_idx)]
    first = opt4gptq.gptq_gemm(*args, False, 4).clone()
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(first.cpu().numpy(), problem)
    for _ in range(20):
        again = opt4gptq.gptq_gemm(*args, False, 4)
        assert torch.equal(again, first)


@pytest.mark.parametrize("m", [1, 8, 51])
def test_cuda_graph_replay_equals_eager(m):
    import torch

    problem = make_problem(m=m, k=2048, n=512, bits=4, group_size=128, act_order=True, use_exllama=True)
    t = problem.t
    a, qweight, zeros, scales, perm = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4).clone()

    out = torch.empty((m, t.n), dtype=torch.float16, device="cuda")
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(a, qweight, zeros, scales, perm, True, 4, out=out), out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    # Replays read the captured input buffers: new activations, new answer.
    fresh = make_problem(m=m, k=2048, n=512, bits=4, group_size=128, act_order=True, use_exllama=True)
    a.copy_(torch.from_numpy(fresh.a))
    graph.replay()
    torch.cuda.synchronize()
    replayed = Problem(a=fresh.a, t=t, use_exllama=True, seed=fresh.seed, kernel=opt4gptq.last_kernel())
    assert_matches_reference(out.cpu().numpy(), replayed)


def test_two_streams_in_parallel():
    import torch

    problems = [make_problem(m=m, k=4096, n=2048, bits=4, group_size=128, act_order=True, use_exllama=False)
                for m in (1, 33)]
    streams = [torch.cuda.Stream() for _ in problems]
    outs = []
    for problem, stream in zip(problems, streams):
        t = problem.t
        with torch.cuda.stream(stream):
            args = [torch.from_numpy(x).to("cuda", non_blocking=False) for x in
                    (problem.a, t.qweight, t.qzeros, t.scales, t.g_idx)]
            outs.append([opt4gptq.gptq_gemm(*args, False, 4) for _ in range(5)][-1])
            problem.kernel = opt4gptq.last_kernel()
    torch.cuda.synchronize()
    for problem, out in zip(problems, outs):
        assert_matches_reference(out.cpu().numpy(), problem)


@pytest.mark.parametrize("bits", BITS)
def test_shuffle_on_gpu_matches_numpy(bits):
    import torch
    from opt4gptq import pack

    t = pack.random_gptq(512, 256, bits, 128, act_order=True, rng=np.random.default_rng())
    perm = np.argsort(t.g_idx, kind="stable").astype(np.int32)
    q = torch.from_numpy(t.qweight.copy()).cuda()
    opt4gptq.gptq_shuffle(q, torch.from_numpy(perm).cuda(), bits)
    assert np.array_equal(q.cpu().numpy(), pack.shuffle(t.qweight, perm, bits))


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    problem = make_problem(m=7, k=1024, n=256, bits=4, group_size=128, act_order=True, use_exllama=True)
    from conftest import Library

    lib = Library("cupy", lambda x: cupy.asarray(x.copy()), lambda x: cupy.asnumpy(x),
                  lambda: cupy.cuda.Device().synchronize())
    out = run_op(problem, lib)
    assert_matches_reference(out, problem)


def test_mixed_devices_are_refused():
    import torch

    problem = make_problem(m=2, k=128, n=64, bits=4, group_size=32, act_order=False, use_exllama=False)
    t = problem.t
    with pytest.raises(ValueError, match="b_q_weight is on cpu but a is on cuda:0"):
        opt4gptq.gptq_gemm(torch.from_numpy(problem.a).cuda(), torch.from_numpy(t.qweight),
                           torch.from_numpy(t.qzeros).cuda(), torch.from_numpy(t.scales).cuda(), None, False, 4)


def test_bad_gpu_indices_are_refused_before_launch():
    import torch

    problem = make_problem(m=2, k=256, n=64, bits=4, group_size=64, act_order=True, use_exllama=False)
    t = problem.t
    cu = [torch.from_numpy(x).cuda() for x in (problem.a, t.qweight, t.qzeros, t.scales)]
    g_idx = torch.from_numpy(t.g_idx).cuda()
    g_idx[5] = 4
    with pytest.raises(ValueError, match="b_g_idx has entries outside 0..3"):
        opt4gptq.gptq_gemm(*cu, g_idx, False, 4)
    with pytest.raises(ValueError, match="must be a permutation"):
        opt4gptq.gptq_gemm(*cu, torch.from_numpy(t.g_idx).cuda(), True, 4)


@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("m", [1, 64, 300])
def test_dense_path(cuda, m, bits, use_exllama):
    """Dequantize + torch.matmul, the many-rows path, forced at every size."""
    problem = make_problem(m=m, k=1024, n=512, bits=bits, group_size=128, act_order=True, use_exllama=use_exllama)
    assert_matches_reference(run_op(problem, cuda, path="dense"), problem)
    assert problem.kernel == "dense"


def test_many_rows_take_the_dense_path_and_capture_in_a_graph():
    """Many rows: dequantize + cuBLAS, except on Hopper, where the wgmma kernels
    serve every row count (and never allocate the dense weights)."""
    import torch

    problem = make_problem(m=300, k=2048, n=1024, bits=4, group_size=128, act_order=True, use_exllama=True)
    args = exllama_tensors_on_cuda(problem)
    eager = opt4gptq.gptq_gemm(*args, True, 4).clone()
    expected = "wgmma" if torch.cuda.get_device_capability() == (9, 0) else "dense"
    assert opt4gptq.last_kernel() == expected
    out = torch.empty_like(eager)
    graph = capture_in_graph(lambda: opt4gptq.gptq_gemm(*args, True, 4, out=out), out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    problem.kernel = expected
    assert_matches_reference(out.cpu().numpy(), problem)


def test_dense_path_output_is_checked():
    import torch

    problem = make_problem(m=64, k=256, n=64, bits=4, group_size=64, act_order=False, use_exllama=False)
    t = problem.t
    cu = [torch.from_numpy(x).cuda() for x in (problem.a, t.qweight, t.qzeros, t.scales, t.g_idx)]
    with pytest.raises(ValueError, match="out must be float16"):
        opt4gptq.gptq_gemm(*cu, False, 4, out=torch.empty(64, 63, dtype=torch.float16, device="cuda"))
