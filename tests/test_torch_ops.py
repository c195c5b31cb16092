"""torch.ops.opt4gptq.*: registered custom ops that torch's own checker accepts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
if not hasattr(torch.library, "custom_op"):
    pytest.skip(f"torch {torch.__version__} has no torch.library.custom_op (needs 2.4+)", allow_module_level=True)

import opt4gptq  # noqa: E402
import opt4gptq.torch_ops  # noqa: E402,F401
from conftest import assert_matches_reference, make_problem  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and opt4gptq.backend() == "cuda" else [])


def tensors(problem, device, use_exllama):
    t = problem.t
    move = lambda x: torch.from_numpy(x.copy()).to(device)  # noqa: E731
    qweight = move(t.qweight)
    if use_exllama:
        perm = move(problem.perm)
        torch.ops.opt4gptq.gptq_shuffle(qweight, perm, t.bits)
        index = perm
    else:
        index = move(t.g_idx)
    return [move(problem.a), qweight, move(t.qzeros), move(t.scales), index]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
def test_op_matches_reference_and_passes_opcheck(device, use_exllama):
    problem = make_problem(m=5, k=256, n=64, bits=4, group_size=64, act_order=True, use_exllama=use_exllama)
    args = tensors(problem, device, use_exllama)
    out = torch.ops.opt4gptq.gptq_gemm(*args, use_exllama, False, 4)
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(out.cpu().numpy(), problem)
    torch.library.opcheck(torch.ops.opt4gptq.gptq_gemm, (*args, use_exllama, False, 4))


def test_shuffle_op_passes_opcheck():
    problem = make_problem(m=1, k=256, n=64, bits=4, group_size=64, act_order=True, use_exllama=True)
    qweight = torch.from_numpy(problem.t.qweight.copy())
    perm = torch.from_numpy(problem.perm)
    torch.library.opcheck(torch.ops.opt4gptq.gptq_shuffle, (qweight, perm, 4))


def test_compiled_function_calls_the_op():
    problem = make_problem(m=3, k=128, n=32, bits=4, group_size=32, act_order=False, use_exllama=False)
    args = tensors(problem, "cpu", False)

    @torch.compile(fullgraph=True, backend="eager")
    def layer(a, qweight, qzeros, scales, g_idx):
        return torch.ops.opt4gptq.gptq_gemm(a, qweight, qzeros, scales, g_idx, False, False, 4) * 2

    out = layer(*args)
    problem.kernel = "cpu"
    assert_matches_reference((out / 2).numpy(), problem)
