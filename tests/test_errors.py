"""Every bad input is a Python exception that names the argument; nothing crashes."""

import ctypes

import numpy as np
import pytest

import opt4gptq
from conftest import make_problem


@pytest.fixture
def args():
    problem = make_problem(m=4, k=256, n=64, bits=4, group_size=64, act_order=True, use_exllama=False)
    t = problem.t
    return dict(a=problem.a, b_q_weight=t.qweight, b_gptq_qzeros=t.qzeros, b_gptq_scales=t.scales,
                b_g_idx=t.g_idx, use_exllama=False, bit=4)


def call(args, **changes):
    merged = dict(args, **changes)
    return opt4gptq.gptq_gemm(merged.pop("a"), merged.pop("b_q_weight"), merged.pop("b_gptq_qzeros"),
                              merged.pop("b_gptq_scales"), merged.pop("b_g_idx"), merged.pop("use_exllama"),
                              merged.pop("bit"), **merged)


def test_valid_arguments_pass(args):
    assert call(args).shape == (4, 64)


@pytest.mark.parametrize("name, bad, error, pattern", [
    ("a", lambda a: a["a"].astype(np.float32), TypeError, "a must be float16; got float32"),
    ("b_q_weight", lambda a: a["b_q_weight"].astype(np.int64), TypeError, "b_q_weight must be int32; got int64"),
    ("b_gptq_qzeros", lambda a: a["b_gptq_qzeros"].view(np.uint32), TypeError, "b_gptq_qzeros must be int32; got uint32"),
    ("b_gptq_scales", lambda a: a["b_gptq_scales"].astype(np.float32), TypeError, "b_gptq_scales must be float16"),
    ("b_g_idx", lambda a: a["b_g_idx"].astype(np.int64), TypeError, "b_g_idx must be int32; got int64"),
])
def test_wrong_dtype_names_the_argument(args, name, bad, error, pattern):
    with pytest.raises(error, match=pattern):
        call(args, **{name: bad(args)})


@pytest.mark.parametrize("bit", [0, 1, 5, 16, 32, -4, True])
def test_bad_bit_width(args, bit):
    with pytest.raises(ValueError, match="bit must be one of 2, 3, 4, 8"):
        call(args, bit=bit)


def test_k_not_a_multiple_of_32(args):
    with pytest.raises(ValueError, match="a has K=250 columns"):
        call(args, a=args["a"][:, :250].copy())


def test_weight_rows_disagree_with_k(args):
    with pytest.raises(ValueError, match="b_q_weight has 31 rows"):
        call(args, b_q_weight=args["b_q_weight"][:31].copy())


def test_scales_columns_disagree_with_n(args):
    with pytest.raises(ValueError, match="b_gptq_scales has 32 columns"):
        call(args, b_gptq_scales=args["b_gptq_scales"][:, :32].copy())


def test_group_count_must_divide_k(args):
    scales = np.ones((3, 64), np.float16)
    zeros = np.zeros((3, 8), np.int32)
    with pytest.raises(ValueError, match="b_gptq_scales has 3 groups.*does not divide K=256"):
        call(args, b_gptq_scales=scales, b_gptq_qzeros=zeros, b_g_idx=None)


def test_zeros_shape(args):
    with pytest.raises(ValueError, match=r"b_gptq_qzeros must have shape \[4, 8\]"):
        call(args, b_gptq_qzeros=args["b_gptq_qzeros"][:3].copy())


def test_g_idx_length(args):
    with pytest.raises(ValueError, match=r"b_g_idx must have shape \[256\]"):
        call(args, b_g_idx=args["b_g_idx"][:128].copy())


@pytest.mark.parametrize("value", [-1, 4, 1000])
def test_g_idx_out_of_range(args, value):
    g_idx = args["b_g_idx"].copy()
    g_idx[17] = value
    with pytest.raises(ValueError, match=rf"b_g_idx\[17\] = {value} is out of range: there are 4 groups"):
        call(args, b_g_idx=g_idx)


def test_exllama_index_must_be_a_permutation(args):
    # The classic mistake: handing g_idx (not argsort(g_idx)) to the exllama path.
    with pytest.raises(ValueError, match="must be a permutation"):
        call(args, use_exllama=True)


def test_output_shape_and_dtype(args):
    with pytest.raises(ValueError, match=r"out must have shape \[4, 64\]"):
        call(args, out=np.empty((4, 63), np.float16))
    with pytest.raises(TypeError, match="out must be float16"):
        call(args, out=np.empty((4, 64), np.float32))


@pytest.mark.parametrize("shape", [(256,), (1, 4, 256)])
def test_activations_must_be_2d(args, shape):
    with pytest.raises(ValueError, match="a must be 2-D"):
        call(args, a=np.zeros(shape, np.float16))


def test_non_contiguous_weights_are_refused(args):
    fortran = np.asfortranarray(args["b_q_weight"])
    with pytest.raises(ValueError, match="b_q_weight must be contiguous"):
        call(args, b_q_weight=fortran)


def test_column_strided_activations_are_refused(args):
    wide = np.repeat(args["a"], 2, axis=1)[:, ::2]
    with pytest.raises(ValueError, match="a must have unit stride along K"):
        call(args, a=wide)


def test_not_an_array(args):
    with pytest.raises(TypeError, match="a must be an array"):
        call(args, a=[[1.0] * 256])


def test_forced_path_name(args):
    with pytest.raises(ValueError, match="path must be .skinny., .tiled., .exllama., .mma. or .wgmma."):
        call(args, path="fast")


def test_shuffle_bad_bit_and_shape():
    q = np.zeros((32, 64), np.int32)
    with pytest.raises(ValueError, match="bit must be one of"):
        opt4gptq.gptq_shuffle(q, np.arange(256, dtype=np.int32), 6)
    with pytest.raises(ValueError, match=r"q_perm must have shape \[256\]"):
        opt4gptq.gptq_shuffle(q, np.arange(255, dtype=np.int32), 4)
    with pytest.raises(ValueError, match="q_weight must be 2-D"):
        opt4gptq.gptq_shuffle(np.zeros(64, np.int32), np.arange(256, dtype=np.int32), 4)


# --- A GPU array handed to a CPU-only build -------------------------------------------

class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class FakeCudaArray:
    """Claims to live on cuda:0. Its bytes are host memory no kernel ever reads:
    the engine must refuse it before touching data."""

    def __init__(self, like: np.ndarray):
        self._host = like
        self.shape = like.shape
        self._shape = (ctypes.c_int64 * like.ndim)(*like.shape)
        code = {np.dtype(np.float16): 2, np.dtype(np.int32): 0}[like.dtype]
        self._managed = _DLManagedTensor(
            _DLTensor(like.ctypes.data, _DLDevice(2, 0), like.ndim, _DLDataType(code, like.dtype.itemsize * 8, 1),
                      self._shape, None, 0), None, None)

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        new_capsule = ctypes.pythonapi.PyCapsule_New
        new_capsule.restype = ctypes.py_object
        new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new_capsule(ctypes.addressof(self._managed), b"dltensor", None)


@pytest.mark.skipif(opt4gptq.backend() != "cpu", reason="only a CPU-only build refuses GPU arrays")
def test_gpu_array_on_cpu_only_build(args):
    fake = {k: FakeCudaArray(v) for k, v in args.items() if isinstance(v, np.ndarray)}
    out = FakeCudaArray(np.empty((4, 64), np.float16))
    with pytest.raises(ValueError, match="a is on cuda:0, which this opt4gptq build \\(cpu\\) cannot serve; reinstall with OPT4GPTQ_GPU=cuda"):
        opt4gptq.gptq_gemm(fake["a"], fake["b_q_weight"], fake["b_gptq_qzeros"], fake["b_gptq_scales"],
                           fake["b_g_idx"], False, 4, out=out)


def test_mixed_devices_are_refused(args):
    fake_out = FakeCudaArray(np.empty((4, 64), np.float16))
    with pytest.raises(ValueError, match="out is on cuda:0 but a is on cpu"):
        call(args, out=fake_out)


def test_unknown_variant(args):
    with pytest.raises(ValueError, match="variant must be one of"):
        call(args, variant="turbo")


def test_exllama_path_refused_where_it_cannot_compute(args):
    with pytest.raises(ValueError, match="path='exllama' needs use_exllama=True"):
        call(args, path="exllama")


def test_dense_path_needs_torch_gpu_tensors(args):
    with pytest.raises(ValueError, match="path='dense' needs torch GPU tensors"):
        call(args, path="dense")


def engine_gemm(args, workspace):
    """The engine's own entry, which also takes the float16 workspace that gptq_gemm
    allocates for the split-K variants on a GPU. CPU arrays never use one, but a
    workspace that is given is checked like every operand."""
    from opt4gptq import _C
    from opt4gptq._frameworks import capsule, launch_for

    operands = [args[name] for name in ("a", "b_q_weight", "b_gptq_qzeros", "b_gptq_scales", "b_g_idx")]
    operands += [np.empty((4, 64), np.float16)]
    operands = [capsule(x, launch_for(x)) for x in operands]
    return _C.gemm(*operands, False, 4, False, None, "baseline", 0,
                   None if workspace is None else capsule(workspace, launch_for(workspace)))


# K = 256: two K blocks of 128 rows, so two [4, 64] slices of shares.
@pytest.mark.parametrize("workspace, error, pattern", [
    (np.zeros((2, 4, 64), np.int64), TypeError, "workspace must be float16; got int64"),
    (np.zeros((2, 4, 63), np.float16), ValueError,
     r"workspace has 504 elements; the split-K shares need a float16 \[K blocks, M, N\] = \[2, 4, 64\]"),
    (np.zeros((2, 4, 128), np.float16)[:, :, ::2], ValueError, "workspace must be contiguous"),
    (FakeCudaArray(np.zeros((2, 4, 64), np.float16)), ValueError, "workspace is on cuda:0 but a is on cpu"),
])
def test_bad_workspace_names_the_argument(args, workspace, error, pattern):
    with pytest.raises(error, match=pattern):
        engine_gemm(args, workspace)


def test_a_workspace_with_a_slice_per_k_block_is_accepted(args):
    assert engine_gemm(args, np.zeros(2 * 4 * 64 + 10, np.float16)) == "cpu"
    assert engine_gemm(args, None) == "cpu"
