"""gptq_gemm on the CPU backend equals the float64 reference, on every axis of the format."""

import numpy as np
import pytest

import opt4gptq
from conftest import Problem, assert_matches_reference, make_problem, numpy_library, run_op, torch_library
from opt4gptq import pack

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("bits", BITS)
def test_every_format(bits, group_size, act_order, use_exllama, v2):
    problem = make_problem(m=9, k=384, n=64, bits=bits, group_size=group_size,
                           act_order=act_order, use_exllama=use_exllama, v2=v2)
    assert_matches_reference(run_op(problem, numpy_library()), problem)


@pytest.mark.parametrize("m", [0, 1, 7, 8, 9, 50, 51, 300])
@pytest.mark.parametrize("bits", BITS)
def test_every_batch_size(bits, m):
    problem = make_problem(m=m, k=4096, n=32, bits=bits, group_size=128, act_order=True, use_exllama=True)
    assert_matches_reference(run_op(problem, numpy_library()), problem)


@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("k", [128, 384, 4096])
@pytest.mark.parametrize("bits", BITS)
def test_every_depth(bits, k, use_exllama):
    problem = make_problem(m=3, k=k, n=96, bits=bits, group_size=32, act_order=True, use_exllama=use_exllama)
    assert_matches_reference(run_op(problem, numpy_library()), problem)


@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
def test_torch_cpu_tensors_in_torch_tensor_out(use_exllama):
    lib = torch_library("cpu")
    problem = make_problem(m=5, k=256, n=64, bits=4, group_size=128, act_order=True, use_exllama=use_exllama)
    assert_matches_reference(run_op(problem, lib), problem)


def test_returns_the_callers_array_type():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    problem = make_problem(m=2, k=128, n=32, bits=4, group_size=32, act_order=False, use_exllama=False)
    t = problem.t
    out_np = opt4gptq.gptq_gemm(problem.a, t.qweight, t.qzeros, t.scales, t.g_idx, False, 4)
    out_torch = opt4gptq.gptq_gemm(torch.from_numpy(problem.a), torch.from_numpy(t.qweight),
                                   torch.from_numpy(t.qzeros), torch.from_numpy(t.scales),
                                   torch.from_numpy(t.g_idx), False, 4)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float16 and out_np.shape == (2, 32)
    assert isinstance(out_torch, torch.Tensor) and out_torch.dtype == torch.float16
    assert np.array_equal(out_np, out_torch.numpy())


def test_no_index_forms_agree():
    """None, an empty array and vLLM 0.3.3's meta tensor all mean 'no permutation'."""
    problem = make_problem(m=4, k=256, n=32, bits=4, group_size=64, act_order=False, use_exllama=True)
    t = problem.t
    forms = [None, np.zeros((0,), np.int32)]
    try:
        import torch

        forms.append(torch.empty((1, 1), device="meta"))
    except ImportError:
        pass
    qweight = pack.shuffle(t.qweight, None, 4)
    results = [opt4gptq.gptq_gemm(problem.a, qweight, t.qzeros, t.scales, g, True, 4) for g in forms]
    assert_matches_reference(results[0], problem)
    for other in results[1:]:
        assert np.array_equal(results[0], other)


def test_repeated_calls_are_bitwise_identical():
    problem = make_problem(m=8, k=1024, n=64, bits=4, group_size=128, act_order=True, use_exllama=False)
    first = run_op(problem, numpy_library())
    for _ in range(3):
        assert np.array_equal(first, run_op(problem, numpy_library()))


def test_row_strided_activations_are_read_correctly():
    problem = make_problem(m=6, k=256, n=32, bits=4, group_size=128, act_order=False, use_exllama=False)
    t = problem.t
    wide = np.random.default_rng(problem.seed).standard_normal((6, 512)).astype(np.float16)
    wide[:, :256] = problem.a
    view = wide[:, :256]
    assert not view.flags.c_contiguous
    out = opt4gptq.gptq_gemm(view, t.qweight, t.qzeros, t.scales, t.g_idx, False, 4)
    assert_matches_reference(out, problem)


def test_read_only_inputs_are_accepted():
    problem = make_problem(m=2, k=128, n=32, bits=4, group_size=32, act_order=False, use_exllama=False)
    t = problem.t
    arrays = [problem.a, t.qweight, t.qzeros, t.scales, t.g_idx]
    for x in arrays:
        x.setflags(write=False)
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("numpy < 2 cannot export read-only arrays through DLPack")
    out = opt4gptq.gptq_gemm(*arrays, False, 4)
    assert_matches_reference(out, problem)


def test_forced_paths_agree_with_reference():
    problem = make_problem(m=20, k=256, n=64, bits=3, group_size=32, act_order=True, use_exllama=True)
    for path in ("skinny", "tiled"):
        assert_matches_reference(run_op(problem, numpy_library(), path=path), problem)


def test_explicit_g_idx_may_index_more_groups_than_divide_k():
    """A row-parallel act-order shard (vLLM marks it use_exllama=False) keeps the
    full layer's scales: its g_idx names groups of the whole layer."""
    full = make_problem(m=3, k=384, n=64, bits=4, group_size=128, act_order=True, use_exllama=False)
    t = full.t
    rows = np.arange(128, 384)  # this shard's rows: 256 of them, 3 groups in the table
    shard = pack.GPTQTensors(qweight=pack.pack_rows(pack.unpack_rows(t.qweight, 4)[rows], 4), qzeros=t.qzeros,
                             scales=t.scales, g_idx=t.g_idx[rows].copy(), bits=4, group_size=128, v2=False)
    problem = Problem(a=full.a[:, rows].copy(), t=shard, use_exllama=False, seed=full.seed)
    assert_matches_reference(run_op(problem, numpy_library()), problem)
