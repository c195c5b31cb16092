"""The CPU backend's promises beyond matching the reference (tests/test_gemm.py):
batch invariance (row i of the output is bitwise the same whatever M is and
wherever the row sits in `a`), thread-count invariance, and agreement of the
AVX-512 and portable code paths, on every format axis; plus the float64
reference check on shapes that reach every kernel (direct and tile, ragged
column tails, groups that do not fill whole words)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import opt4gptq
from conftest import ROOT, assert_matches_reference, make_problem, numpy_library, run_op

BITS = [2, 3, 4, 8]
# (k, n, group_size): words of every width; n not a multiple of 64 or 128 (tile tails,
# direct blocks plus a tile remainder); a 16-row group (groups split 32-row packs).
SHAPES = [(256, 96, 64), (512, 320, 128), (384, 64, 32), (128, 160, 16)]
FORMATS = [(exllama, act) for exllama in (True, False) for act in (False, True)]
FORMAT_IDS = ["exllama-plain", "exllama-act", "alt-plain", "alt-act"]


def gemm_rows(problem, a: np.ndarray) -> np.ndarray:
    """gptq_gemm of `a` (any rows) with the problem's weights, into a NaN-poisoned output."""
    saved = problem.a
    problem.a = a
    try:
        return run_op(problem, numpy_library())
    finally:
        problem.a = saved


def skip_if_unsupported(bits: int, k: int, n: int, group_size: int) -> None:
    if (n * bits) % 32:
        pytest.skip(f"N={n} does not pack {bits}-bit zero points into whole words")
    if group_size > 0 and k % group_size:
        pytest.skip("group size does not divide K")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use_exllama,act_order", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("bits", BITS)
def test_rows_are_bitwise_the_same_whatever_m_and_wherever_they_sit(bits, use_exllama, act_order, shape):
    k, n, group_size = shape
    skip_if_unsupported(bits, k, n, group_size)
    problem = make_problem(m=20, k=k, n=n, bits=bits, group_size=group_size, act_order=act_order,
                           use_exllama=use_exllama, v2=bits == 3)
    whole = run_op(problem, numpy_library())
    assert_matches_reference(whole, problem)
    a = problem.a
    for i in (0, 1, 5, 19):  # 20 rows take the tile kernel, one row the direct kernel
        alone = gemm_rows(problem, a[i:i + 1])
        assert np.array_equal(alone[0].view(np.uint16), whole[i].view(np.uint16)), f"row {i} alone: {problem.describe()}"
    # Every M from 1 to 8 (both kernels), rows shifted down by 3 behind other rows.
    for m in range(1, 9):
        shifted = np.concatenate([a[9:12], a[:m]])
        got = gemm_rows(problem, shifted)
        assert np.array_equal(got[3:].view(np.uint16), whole[:m].view(np.uint16)), f"M={m} shifted: {problem.describe()}"


@pytest.mark.parametrize("m", [1, 2, 5, 16, 17, 64])
@pytest.mark.parametrize("bits", BITS)
def test_every_kernel_matches_the_reference(bits, m):
    """M <= 16 takes the direct kernel (2/4/8-bit), more rows the tile kernel; 200 columns leave a
    ragged tail after the direct blocks and the 64-column tile blocks."""
    n = {2: 208, 3: 224, 4: 200, 8: 200}[bits]
    problem = make_problem(m=m, k=512, n=n, bits=bits, group_size=128, act_order=True, use_exllama=True)
    assert_matches_reference(run_op(problem, numpy_library()), problem)


def test_strided_rows_of_a_give_the_same_rows():
    problem = make_problem(m=6, k=256, n=128, bits=4, group_size=128, act_order=False, use_exllama=True)
    whole = run_op(problem, numpy_library())
    wide = np.zeros((6, 300), dtype=np.float16)
    wide[:, :256] = problem.a
    t = problem.t
    qweight = t.qweight.copy()
    opt4gptq.gptq_shuffle(qweight, None, 4)
    got = opt4gptq.gptq_gemm(wide[:, :256], qweight, t.qzeros, t.scales, None, True, 4)
    assert np.array_equal(got.view(np.uint16), whole.view(np.uint16))


# Writes a digest of outputs for several formats and M; run under different settings.
DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import make_problem, numpy_library, run_op
    digest = hashlib.sha256()
    for bits, exllama, act, m in [(4, True, True, 1), (4, True, False, 2), (4, False, True, 1), (2, True, False, 3),
                                  (8, False, False, 5), (3, True, True, 2), (4, True, True, 70), (8, True, True, 1)]:
        n = 256 if bits == 3 else 208
        problem = make_problem(m=m, k=1024, n=n, bits=bits, group_size=128, act_order=act, use_exllama=exllama, seed=7)
        digest.update(run_op(problem, numpy_library()).tobytes())
    print(digest.hexdigest())
""")


def digest_with(env_overrides: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OPT4GPTQ_NUM_THREADS", "OPT4GPTQ_CPU_ISA")}
    env.update(env_overrides)
    result = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT, str(ROOT / "tests")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_results_do_not_depend_on_the_thread_count():
    default = digest_with({})
    for threads in ("1", "3"):
        assert digest_with({"OPT4GPTQ_NUM_THREADS": threads}) == default, f"OPT4GPTQ_NUM_THREADS={threads}"


def test_avx512_avx2_and_portable_code_agree_bitwise():
    """OPT4GPTQ_CPU_ISA forces a code path (where the CPU lacks AVX-512 the default already is another one)."""
    default = digest_with({})
    for isa in ("avx2", "portable"):
        assert digest_with({"OPT4GPTQ_CPU_ISA": isa}) == default, f"OPT4GPTQ_CPU_ISA={isa}"


def test_concurrent_callers_get_the_same_bits():
    """Python threads calling at once (the GIL is released): one owns the pool, the others run alone."""
    import threading

    problems = [make_problem(m=m, k=512, n=208, bits=4, group_size=128, act_order=True, use_exllama=True)
                for m in (1, 5, 24)]
    expected = [run_op(p, numpy_library()) for p in problems]
    failures = []

    def worker(index: int) -> None:
        for _ in range(20):
            p = problems[index % len(problems)]
            t = p.t
            qweight = t.qweight.copy()
            opt4gptq.gptq_shuffle(qweight, p.perm, 4)
            got = opt4gptq.gptq_gemm(p.a, qweight, t.qzeros, t.scales, p.perm, True, 4)
            if not np.array_equal(got.view(np.uint16), expected[index % len(problems)].view(np.uint16)):
                failures.append(index)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a caller hung"
    assert not failures, f"callers {sorted(set(failures))} got different bits"


# Starts the pool, forks, and has the child compute the same call: a forked child
# has no helper threads (and may hold copies of their locks), so it must run alone.
FORK_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from conftest import assert_matches_reference, make_problem, numpy_library, run_op
    problem = make_problem(m=3, k=1024, n=512, bits=4, group_size=128, act_order=True, use_exllama=True)
    out = run_op(problem, numpy_library())
    assert_matches_reference(out, problem)  # the float64 reference, before the fork
    parent = out.tobytes()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, b"same" if run_op(problem, numpy_library()).tobytes() == parent else b"diff")
        os._exit(0)
    _, status = os.waitpid(child, 0)
    print(os.read(read, 4).decode(), status)
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_computes_without_the_parents_threads():
    env = dict(os.environ, OPT4GPTQ_NUM_THREADS="3")
    result = subprocess.run([sys.executable, "-c", FORK_SCRIPT, str(ROOT / "tests")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["same", "0"], result.stdout + result.stderr
