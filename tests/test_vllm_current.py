"""Current vLLM (0.33.0)'s own GPTQ layer, served by opt4gptq through opt4gptq.vllm.

What runs is vLLM's real source (see vllm_current_harness.py): AutoGPTQConfig
and AutoGPTQLinearMethod build the layer, ExllamaLinearKernel shuffles its
weights in process_weights_after_loading and calls ``ops.gptq_gemm`` in apply,
vLLM's plugin loader calls our entry point. vLLM's compiled ops are absent, so
reaching one fails. Checked here: plain, merged-column and row-parallel layers
at 4 and 8 bits with group sizes 32/64/128, two forwards each against a float64
reference; the same under torch.compile(fullgraph=True); our op at every bit
width with ``use_v2_format`` both ways and one group; unpatch; the refusals.

Not covered, because current vLLM does not send it to these ops: act-order
(vLLM refuses ``desc_act=True`` with groups), ``group_size=-1`` (Exllama
declines channelwise layers), 2/3-bit (AutoGPTQConfig accepts 4 and 8) and
``use_v2_format=True`` (ExllamaLinearKernel always passes False); the last
three are tested on the op with vLLM's signature instead. Not covered at all
here: vLLM's kernel choice (stubbed as ``--linear-backend exllama``), its
weight loader, its engine and workers, and real vLLM's compiled model; those
need vLLM installed on a GPU machine.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="vLLM's GPTQ layer is torch code")
if sys.version_info < (3, 11):
    pytest.skip("vLLM 0.33.0's source needs Python >= 3.11", allow_module_level=True)
if not hasattr(torch.library, "custom_op"):
    pytest.skip(f"torch {torch.__version__}: the current-vLLM patch needs torch.library.custom_op (torch >= 2.4; "
                "vLLM 0.33.0 pins torch 2.14)", allow_module_level=True)

import opt4gptq  # noqa: E402
import opt4gptq.vllm as o4v  # noqa: E402
from conftest import Problem, assert_matches_reference, fresh_seed, make_problem, vllm_source_or_skip  # noqa: E402

import vllm_current_harness as harness  # noqa: E402

TESTS = Path(__file__).resolve().parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and opt4gptq.backend() == "cuda" else [])


@pytest.fixture(scope="module")
def source():
    return vllm_source_or_skip(harness)


@pytest.fixture
def vllm(source):
    modules = harness.install(source)
    yield modules
    o4v.unpatch()
    harness.uninstall()


@pytest.fixture
def import_hooks():
    """register() may leave an import hook; other tests must not inherit it."""
    saved = list(sys.meta_path)
    yield
    sys.meta_path[:] = saved


@pytest.fixture
def served(monkeypatch):
    """How often opt4gptq's own ops ran."""
    calls = {"gptq_gemm": 0, "gptq_shuffle": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(opt4gptq.ops, "gptq_gemm", counting("gptq_gemm", opt4gptq.ops.gptq_gemm))
    monkeypatch.setattr(opt4gptq, "gptq_shuffle", counting("gptq_shuffle", opt4gptq.gptq_shuffle))
    return calls


def build(vllm, bits, group_size, layer="plain", k=512, n=256, device="cpu", seed=None):
    """vLLM's layer with a random symmetric checkpoint (this rank's shard of it) loaded."""
    seed = fresh_seed() if seed is None else seed
    rng = np.random.default_rng(seed)
    parts = [n // 2, n // 4, n // 4] if layer == "merged_columns" else [n]
    full_k = 2 * k if layer == "row_parallel" else k
    method, weights, t = harness.build_layer(vllm, bits, group_size, k, parts, rng, device=device, full_k=full_k,
                                             rank=1 if layer == "row_parallel" else 0)
    return method, weights, t, seed


def check_forward(method, layer, t, seed, device, m=3):
    """Two forwards (the second with a bias) against the float64 reference."""
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((2, m, t.k)).astype(np.float16)).to(device)
    out = method.apply(layer, x)
    assert out.shape == (2, m, t.n) and out.dtype == torch.float16
    problem = Problem(a=x.reshape(-1, t.k).cpu().numpy(), t=t, use_exllama=True, seed=seed,
                      kernel=opt4gptq.last_kernel())
    assert_matches_reference(out.reshape(-1, t.n).cpu().numpy(), problem)
    bias = torch.linspace(-1, 1, t.n, dtype=torch.float16, device=device)
    again = method.apply(layer, x, bias)
    torch.testing.assert_close(again, out + bias, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("layer", ["plain", "merged_columns", "row_parallel"])
def test_vllm_gptq_layer_is_served_by_opt4gptq(vllm, served, layer, group_size, bits, device):
    o4v.patch()
    method, weights, t, seed = build(vllm, bits, group_size, layer, device=device)
    assert type(method.kernel).__name__ == "ExllamaLinearKernel"
    check_forward(method, weights, t, seed, device)
    assert served == {"gptq_gemm": 2, "gptq_shuffle": 1}
    if device == "cpu":
        assert opt4gptq.last_kernel() == "cpu"


def compile_afresh(function, backend):
    """Dynamo remembers the modules a compiled function reaches, by name and in
    that function's globals; each test here imports vLLM anew, so each compiles
    with a clean slate."""
    torch._dynamo.reset()
    remembered = getattr(getattr(torch._dynamo, "symbolic_convert", None), "_import_module", None)
    if hasattr(remembered, "cache_clear"):
        remembered.cache_clear()
    function = types.FunctionType(function.__code__, dict(function.__globals__), function.__name__,
                                  function.__defaults__, function.__closure__)
    return torch.compile(function, fullgraph=True, backend=backend)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_forward_is_one_graph(vllm, served, backend):
    """vLLM compiles models with fullgraph=True: the patched call must not break the graph."""
    o4v.patch()
    method, layer, t, seed = build(vllm, 4, 128)
    forward = compile_afresh(lambda x: method.apply(layer, x), backend)
    x = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal((4, t.k)).astype(np.float16))
    for _ in range(2):
        out = forward(x)
        assert_matches_reference(out.numpy(), Problem(a=x.numpy(), t=t, use_exllama=True, seed=seed, kernel="cpu"))
    assert served["gptq_gemm"] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("use_exllama", [True, False], ids=["exllama", "alt"])
@pytest.mark.parametrize("group_size", [128, -1])
def test_patched_ops_take_vllms_arguments(vllm, served, group_size, use_exllama, v2, bits, device):
    """The op as vLLM's ExllamaLinearKernel calls it, beyond what that kernel sends today."""
    o4v.patch()
    ops = vllm.exllama.ops
    problem = make_problem(m=5, k=512, n=128, bits=bits, group_size=group_size, act_order=False,
                           use_exllama=use_exllama, v2=v2)
    t = problem.t
    move = lambda x: torch.from_numpy(x.copy()).to(device)  # noqa: E731
    weight = move(t.qweight)
    if use_exllama:
        ops.gptq_shuffle(weight, bits)
    out = ops.gptq_gemm(move(problem.a), weight, move(t.qzeros), move(t.scales), use_exllama, v2, bits)
    problem.kernel = opt4gptq.last_kernel()
    assert_matches_reference(out.cpu().numpy(), problem)
    assert served["gptq_gemm"] == 1


def test_proxy_takes_exactly_vllms_op_parameters(vllm):
    for name in ("gptq_gemm", "gptq_shuffle"):
        theirs = tuple(inspect.signature(getattr(vllm.custom_ops, name)).parameters)
        ours = tuple(inspect.signature(getattr(o4v._ExllamaKernelOps, name)).parameters)[1:]
        assert ours == theirs == o4v._CURRENT.signatures[name]


def test_what_current_vllm_no_longer_sends_to_these_ops(vllm):
    """vLLM's own code refuses these before any op runs (why they are not layer tests)."""
    config = vllm.auto_gptq.AutoGPTQConfig
    with pytest.raises(ValueError, match="desc_act=True"):
        config(weight_bits=4, group_size=128, desc_act=True, is_sym=True, lm_head_quantized=False, dynamic={},
               full_config={})
    for bits in (2, 3):
        with pytest.raises(ValueError, match="Unsupported quantization config"):
            config(weight_bits=bits, group_size=128, desc_act=False, is_sym=True, lm_head_quantized=False,
                   dynamic={}, full_config={})
    with pytest.raises(ValueError, match="channelwise"):
        build(vllm, 4, -1)
    assert "use_v2_format = False" in inspect.getsource(vllm.exllama.ExllamaLinearKernel.apply_weights)


def test_patch_is_idempotent_and_unpatch_restores(vllm):
    original = vllm.exllama.ops
    assert original is vllm.custom_ops
    o4v.patch()
    proxy = vllm.exllama.ops
    o4v.patch()
    assert vllm.exllama.ops is proxy and o4v.is_patched()
    o4v.unpatch()
    assert vllm.exllama.ops is original and not o4v.is_patched()
    with pytest.raises(AttributeError, match="gptq_shuffle"):  # vLLM's own op, absent here
        build(vllm, 4, 128)


def test_patch_after_vllm_shuffled_is_refused(vllm, monkeypatch):
    monkeypatch.setattr(vllm.custom_ops, "gptq_shuffle", lambda q_weight, bit: None)  # as if vLLM's own had run
    method, layer, t, seed = build(vllm, 4, 128)
    monkeypatch.undo()
    o4v.patch()
    with pytest.raises(RuntimeError, match="shuffled by vLLM's own gptq_shuffle before"):
        method.apply(layer, torch.zeros(1, t.k, dtype=torch.float16))


def test_unknown_vllm_version_is_refused_whole(vllm, monkeypatch):
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.32.0")
    with pytest.raises(RuntimeError, match=r"serves current vLLM \(0.33.0\).*found vLLM 0.32.0. Nothing was patched"):
        o4v.patch()
    assert vllm.exllama.ops is vllm.custom_ops


def test_a_local_build_tag_is_the_same_version(vllm, monkeypatch):
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.33.0+rocm700")
    o4v.patch()
    assert o4v.is_patched()


def test_other_op_parameters_are_refused(vllm, monkeypatch):
    def gptq_gemm(a, b_q_weight, b_gptq_qzeros, b_gptq_scales, b_g_idx, use_exllama, use_v2_format, bit):
        raise AssertionError("not to be called")

    monkeypatch.setattr(vllm.custom_ops, "gptq_gemm", gptq_gemm)
    with pytest.raises(RuntimeError, match=r"ops.gptq_gemm takes \(a, .*b_g_idx.*Nothing was patched"):
        o4v.patch()
    assert not o4v.is_patched()


# --- the plugin entry point ----------------------------------------------------------------


def our_entry_point():
    return next((ep for ep in metadata.entry_points(group="vllm.general_plugins") if ep.name == "opt4gptq"), None)


def test_entry_point_is_declared():
    entry_point = our_entry_point()
    assert entry_point is not None, "the installed opt4gptq declares no vllm.general_plugins entry point 'opt4gptq'"
    assert entry_point.value == "opt4gptq.vllm:register"
    assert entry_point.load() is o4v.register


def load_plugins_as_vllm_does(monkeypatch, allowed=("opt4gptq",)):
    """vLLM's own loader; VLLM_PLUGINS keeps other installed plugins out of this test."""
    monkeypatch.setattr(sys.modules["vllm.envs"], "VLLM_PLUGINS", list(allowed))
    importlib.import_module(harness.PLUGINS_MODULE).load_general_plugins()


def test_vllms_plugin_loader_applies_the_patch(vllm, served, monkeypatch, import_hooks):
    monkeypatch.delenv(o4v.ENV_VAR, raising=False)
    load_plugins_as_vllm_does(monkeypatch)
    assert o4v.is_patched()
    method, layer, t, seed = build(vllm, 4, 64)
    check_forward(method, layer, t, seed, "cpu")
    assert served == {"gptq_gemm": 2, "gptq_shuffle": 1}


def test_plugin_opt_outs(vllm, monkeypatch, import_hooks):
    monkeypatch.setenv(o4v.ENV_VAR, "0")
    load_plugins_as_vllm_does(monkeypatch)
    assert not o4v.is_patched()
    monkeypatch.delenv(o4v.ENV_VAR)
    importlib.import_module(harness.PLUGINS_MODULE).plugins_loaded = False
    load_plugins_as_vllm_does(monkeypatch, allowed=("some_other_plugin",))  # vLLM's own switch
    assert not o4v.is_patched()


def test_plugin_loaded_before_the_kernel_patches_it_on_import(vllm, monkeypatch, import_hooks):
    monkeypatch.delenv(o4v.ENV_VAR, raising=False)
    del sys.modules[harness.EXLLAMA_MODULE]
    o4v.register()
    assert not o4v.is_patched()
    exllama = importlib.import_module(harness.EXLLAMA_MODULE)
    assert isinstance(exllama.ops, o4v._ExllamaKernelOps)


def test_plugin_on_unsupported_vllm_warns_and_lets_vllm_run(vllm, monkeypatch, caplog, import_hooks):
    monkeypatch.delenv(o4v.ENV_VAR, raising=False)
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.32.0")
    with caplog.at_level(logging.WARNING, logger="opt4gptq.vllm"):
        o4v.register()
    assert not o4v.is_patched()
    assert "found vLLM 0.32.0" in caplog.text and "keeps its own GPTQ kernels" in caplog.text


# --- in other processes ------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import importlib, sys
    sys.path.insert(0, {tests!r})
    import vllm_current_harness as harness
    vllm = harness.install(harness.fetch_source())
    if {load_plugins!r}:
        importlib.import_module(harness.PLUGINS_MODULE).load_general_plugins()
    import opt4gptq.vllm
    print("patched", opt4gptq.vllm.is_patched(), "served", harness.serve_one_layer(vllm))
""")


def run_child(tmp_path, args, env_extra, load_plugins=False):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS), load_plugins=load_plugins))
    env = {name: value for name, value in os.environ.items() if name != o4v.ENV_VAR}
    env.update(env_extra)
    result = subprocess.run([sys.executable, *args, str(script)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_launcher_runs_a_script_with_the_patch(source, tmp_path):
    assert "patched True served True" in run_child(tmp_path, ["-m", "opt4gptq.vllm"], {})


def test_a_fresh_process_gets_the_patch_from_vllms_plugin_loader(source, tmp_path):
    assert "patched True served True" in run_child(tmp_path, [], {}, load_plugins=True)
    assert "patched False served False" in run_child(tmp_path, [], {o4v.ENV_VAR: "0"}, load_plugins=True)


def _autopatch_installed() -> bool:
    import site

    paths = site.getsitepackages() + [site.getusersitepackages()]
    return any(Path(p, "opt4gptq_vllm_autopatch.pth").exists() for p in paths)


@pytest.mark.skipif(not _autopatch_installed(), reason="opt4gptq_vllm_autopatch.pth is not installed "
                    "(pip install the wheel; editable installs do not place it)")
def test_environment_variable_patches_a_plain_python_process(source, tmp_path):
    assert "patched True served True" in run_child(tmp_path, [], {o4v.ENV_VAR: "1"})
    assert "patched False served False" in run_child(tmp_path, [], {})
