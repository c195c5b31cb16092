"""vLLM 0.3.3's own GPTQ layer, served by opt4gptq through opt4gptq.vllm.patch().

The layer is built by vLLM's GPTQLinearMethod from vLLM's real source (see
vllm_harness.py); vLLM's compiled ops are a guard that fails if reached.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="vLLM's GPTQ layer is torch code")
pytest.importorskip("psutil", reason="vLLM 0.3.3's utils import psutil")

import opt4gptq  # noqa: E402
import opt4gptq.vllm as o4v  # noqa: E402
from conftest import Problem, assert_matches_reference, fresh_seed, vllm_source_or_skip  # noqa: E402
from opt4gptq import pack  # noqa: E402

import vllm_harness  # noqa: E402

TESTS = Path(__file__).resolve().parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and opt4gptq.backend() == "cuda" else [])


@pytest.fixture(scope="module")
def source():
    return vllm_source_or_skip(vllm_harness)


@pytest.fixture
def gptq(source):
    module = vllm_harness.install(source)
    yield module
    o4v.unpatch()
    vllm_harness.uninstall()


def build_layer(gptq, bits, group_size, desc_act, k, n, row_parallel=False, device="cpu", seed=None):
    """A vLLM GPTQ layer with random checkpoint tensors loaded, and the float64 problem it must solve."""
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    full_k = 2 * k if row_parallel else k
    method = gptq.GPTQLinearMethod(gptq.GPTQConfig(bits, group_size, desc_act))
    weights = method.create_weights(k, n, full_k, n, torch.float16)
    t = pack.random_gptq(full_k, n, bits, group_size, act_order=desc_act, rng=rng)
    rows = np.arange(k, 2 * k) if row_parallel else np.arange(k)  # this rank's shard of the input rows
    shard = pack.GPTQTensors(qweight=pack.pack_rows(pack.unpack_rows(t.qweight, bits)[rows], bits),
                             qzeros=t.qzeros, scales=t.scales, g_idx=t.g_idx[rows].copy(), bits=bits,
                             group_size=group_size)
    for name, value in (("qweight", shard.qweight), ("qzeros", shard.qzeros), ("scales", shard.scales),
                        ("g_idx", shard.g_idx)):
        assert tuple(weights[name].shape) == value.shape, f"vLLM sized {name} {tuple(weights[name].shape)}"
        weights[name].data.copy_(torch.from_numpy(value))
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        weights[name].data = weights[name].data.to(device)
    return method, weights, shard, seed


def forward_twice(gptq, method, weights, shard, seed, m, device):
    """vLLM's first forward shuffles; both forwards must equal the reference."""
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((2, m, shard.k)).astype(np.float16))
    x = x.to(device)
    for _ in range(2):
        out = method.apply_weights(weights, x)
        assert out.shape == (2, m, shard.n) and out.dtype == torch.float16
        problem = Problem(a=x.reshape(-1, shard.k).cpu().numpy(), t=shard, use_exllama=False, seed=seed,
                          kernel=opt4gptq.last_kernel())
        assert_matches_reference(out.reshape(-1, shard.n).cpu().numpy(), problem)
    return weights["exllama_state"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("layer", ["plain", "act_order", "row_parallel_act_order", "one_group"])
def test_vllm_gptq_layer_is_served_by_opt4gptq(gptq, layer, bits, device):
    o4v.patch()
    group_size = -1 if layer == "one_group" else 128
    desc_act = layer in ("act_order", "row_parallel_act_order")
    method, weights, shard, seed = build_layer(gptq, bits, group_size, desc_act, k=512, n=256,
                                               row_parallel=layer == "row_parallel_act_order", device=device)
    expected_state = gptq.ExllamaState.UNUSED if layer == "row_parallel_act_order" else gptq.ExllamaState.READY
    assert forward_twice(gptq, method, weights, shard, seed, m=3, device=device) == expected_state
    if device == "cpu":
        assert opt4gptq.last_kernel() == "cpu"


def test_patch_is_idempotent_and_unpatch_restores(gptq):
    original = gptq.ops
    o4v.patch()
    proxy = gptq.ops
    o4v.patch()
    assert gptq.ops is proxy and o4v.is_patched()
    o4v.unpatch()
    assert gptq.ops is original and not o4v.is_patched()
    method, weights, shard, seed = build_layer(gptq, 4, 128, False, k=256, n=64)
    with pytest.raises(AssertionError, match="vLLM's own compiled op `gptq_shuffle` was reached"):
        method.apply_weights(weights, torch.zeros(1, 256, dtype=torch.float16))


def test_patch_after_vllm_shuffled_is_refused(gptq):
    method, weights, shard, seed = build_layer(gptq, 4, 128, True, k=256, n=64)
    weights["exllama_state"] = gptq.ExllamaState.READY  # as if vLLM's own shuffle had run
    weights["g_idx"] = torch.argsort(weights["g_idx"]).to(torch.int)
    o4v.patch()
    with pytest.raises(RuntimeError, match="shuffled by vLLM's own gptq_shuffle before"):
        method.apply_weights(weights, torch.zeros(1, 256, dtype=torch.float16))


def test_unknown_vllm_version_is_refused_whole(gptq, monkeypatch):
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.9.9")
    original = gptq.ops
    with pytest.raises(RuntimeError, match="supports vLLM 0.3.3; found vLLM 0.9.9. Nothing was patched"):
        o4v.patch()
    assert gptq.ops is original


# --- In other processes ------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import vllm_harness
    gptq = vllm_harness.install(vllm_harness.fetch_source())
    import opt4gptq.vllm
    import test_vllm_child
    print("patched", opt4gptq.vllm.is_patched(), "served", test_vllm_child.serve_one_layer(gptq))
""")


def run_child(tmp_path, args, env_extra):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    result = subprocess.run([sys.executable, *args, str(script)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_launcher_runs_a_script_with_the_patch(source, tmp_path):
    out = run_child(tmp_path, ["-m", "opt4gptq.vllm"], {})
    assert "patched True served True" in out, out


def _autopatch_installed() -> bool:
    paths = site.getsitepackages() + [site.getusersitepackages()]
    return any(Path(p, "opt4gptq_vllm_autopatch.pth").exists() for p in paths)


@pytest.mark.skipif(not _autopatch_installed(), reason="opt4gptq_vllm_autopatch.pth is not installed "
                    "(pip install the wheel; editable installs do not place it)")
def test_environment_variable_patches_a_plain_python_process(source, tmp_path):
    out = run_child(tmp_path, [], {"OPT4GPTQ_PATCH_VLLM": "1"})
    assert "patched True served True" in out, out
    out = run_child(tmp_path, [], {"OPT4GPTQ_PATCH_VLLM": "0"})
    assert "patched False" in out, out


@pytest.mark.skipif(not _autopatch_installed(), reason="opt4gptq_vllm_autopatch.pth is not installed")
def test_environment_variable_reaches_spawned_workers(source, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, sys
        sys.path.insert(0, {str(TESTS)!r})
        import test_vllm_child
        if __name__ == "__main__":
            context = multiprocessing.get_context("spawn")
            with context.Pool(1) as pool:
                print(pool.apply(test_vllm_child.child_report))
    """))
    env = dict(os.environ, OPT4GPTQ_PATCH_VLLM="1")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "patched True served True" in result.stdout, result.stdout
