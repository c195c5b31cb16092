"""benchmarks/bench_e2e.py: the torch GPTQ packer, the decode schedule, the decoder's
KV-cache path, --model checkpoints, and a tiny CPU run's JSON (all on the CPU, ~20 s)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from opt4gptq import pack  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_e2e as e2e  # noqa: E402


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k, n, group", [(256, 64, 128), (384, 48, 128), (128, 16, 32)])
def test_packer_matches_pack_quantize(bits, k, n, group):
    """The fast torch RTN packer produces opt4gptq.pack.quantize's tensors bit for bit."""
    rng = np.random.default_rng(bits * 1000 + k + n)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2.0, size=(1, n))).astype(np.float32)
    w[:, 0] = np.abs(w[:, 0])  # a column with no negative value: exercises the v1 zero-point fix
    ref = pack.quantize(w, bits, group)
    got = e2e.quantize_rtn(torch.from_numpy(w), bits, group, chunk=16)  # several column chunks
    assert np.array_equal(got.qweight.numpy(), ref.qweight)
    assert np.array_equal(got.qzeros.numpy(), ref.qzeros)
    assert np.array_equal(got.scales.numpy().view(np.uint16), ref.scales.view(np.uint16))
    assert np.array_equal(got.g_idx.numpy(), ref.g_idx)
    deq = e2e.dequantize_torch(got).numpy()
    assert np.array_equal(deq, ref.dequantize().astype(np.float16))


def test_unpack_inverts_pack():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(64, 24))
    words = pack.pack_rows(q, 4)
    assert np.array_equal(e2e.unpack_rows_torch(torch.from_numpy(words), 4).numpy(), q)
    z = rng.integers(0, 16, size=(3, 24))
    assert np.array_equal(e2e.unpack_cols_torch(torch.from_numpy(pack.pack_cols(z, 4)), 4, 24).numpy(), z)


def test_plan_decode_keeps_every_request_until_its_length():
    rng = np.random.default_rng(2)
    prompts = list(rng.integers(4, 40, size=13))
    outs = list(rng.integers(1, 20, size=13))
    plan = e2e.plan_decode(prompts, outs, bucket=16, cap=13, ctx_max=64)
    for step in plan:
        live = step["live"]
        assert sorted(live) == sorted(r for r in range(13) if outs[r] > step["s"])
        assert step["n"] == len(live) <= step["rows"] <= 13
        assert step["rows"] in (1, 2, 4, 8) or step["rows"] % 8 == 0 or step["rows"] == 13
        assert max(prompts[r] + step["s"] for r in live) <= step["ctx"] <= 64
        assert len(step["holes"]) == len(step["movers"])
    assert len(plan) == max(outs) - 1


def _tiny(name="llama3-8b", **kw):
    return dataclasses.replace(e2e.MODELS[name].shrunk(), **kw)


def test_batched_decode_matches_single_requests_and_prefill():
    """Swap-remove compaction, padding, masks and RoPE positions: every request's logits in a
    batch with ragged lengths equal its logits alone; the last decode step equals a prefill
    over the prompt plus the generated tokens (SDPA, no KV cache)."""
    spec = _tiny(vocab=256)
    _, dense = e2e.random_weights(spec, "cpu", 3, 5.0)
    pairs = [(9, 6), (20, 2), (5, 9), (14, 1), (11, 7)]
    engine = e2e.Engine(spec, len(pairs), 48, 12, "cpu")
    engine.use(dense, e2e.FP16)
    batch = e2e.make_batch(pairs, spec.vocab, 0, "cpu", 16, engine.rows, 48)
    with torch.no_grad():
        together = engine.generate(batch, record_logits=True)
        plan = e2e.plan_decode(batch.prompt_lens, batch.out_lens, 16, engine.rows, 48)
        start = 0
        for r, (p, o) in enumerate(pairs):
            alone = e2e.make_batch([(p, o)], spec.vocab, 0, "cpu", 16, 1, 48)
            alone.tokens = batch.tokens[start:start + p]
            start += p
            single = e2e.Engine(spec, 1, 48, 12, "cpu")
            single.use(dense, e2e.FP16)
            res = single.generate(alone, record_logits=True)
            assert torch.equal(res["tokens"][0, :o], together["tokens"][r, :o])
            for s in range(1, o):
                row = plan[s - 1]["live"].index(r)
                torch.testing.assert_close(together["logits"][s - 1][row], res["logits"][s - 1][0], atol=2e-2, rtol=0)
            if o > 1:  # decode with the KV cache == prefill over prompt + generated tokens
                full = torch.cat([alone.tokens, res["tokens"][0, :o - 1]])
                again = e2e.make_batch([(len(full), 1)], spec.vocab, 0, "cpu", 16, 1, 48)
                again.tokens = full
                logits = single.prefill(again)[0].float()
                torch.testing.assert_close(logits, res["logits"][-1][0], atol=2e-2, rtol=0)


def _check_report(report, models, configs, accuracy=True):
    assert report["mode"] == "cpu-tiny" and report["backend"] and report["device"]
    assert [m["name"] for m in report["models"]] == models
    for m in report["models"]:
        assert list(m["configs"]) == configs
        for name, c in m["configs"].items():
            for key in ("output_tok_s", "total_tok_s", "latency_mean_s"):
                assert c[key]["mean"] > 0 and len(c[key]["values"]) == report["settings"]["repeats"]
            run = c["runs"][0]
            assert run["total_tokens"] > run["output_tokens"] > 0
            assert run["latency_max_s"] <= run["seconds"] * 1.0001
        if accuracy:
            acc = m["accuracy"]
            assert set(acc["variants"]) == set(configs[1:])
            for v in acc["variants"].values():
                assert 0.9 <= v["top1_agreement"] <= 1.0 and v["positions"] > 0 and v["kernel"] == "cpu"
            assert acc["max_logit_diff"] < 1.0 and acc["logit_stats"]["logit_std"] > 1.0
    assert {(r["model"], r["config"]) for r in report["summary"]} == {(m, c) for m in models for c in configs}


def test_quick_cpu_run_writes_json_and_charts(tmp_path):
    out = tmp_path / "e2e"
    assert e2e.main(["--quick", "--device", "cpu", "--models", "qwen1.5-1.8b", "--no-progress",
                     "--variants", "baseline,opt4gptq", "--out", str(out)]) == 0
    report = json.loads((out / "bench_e2e.json").read_text())
    _check_report(report, ["qwen1.5-1.8b"], ["fp16", "baseline", "opt4gptq"])
    m = report["models"][0]
    assert m["tiny"] and m["spec"]["qkv_bias"] and m["crosscheck"]["param_count"] > 0
    assert report["workload"]["output_tokens"] == sum(o for _, o in report["workload"]["lengths"])
    assert (out / "e2e_summary.txt").exists()
    pytest.importorskip("matplotlib")
    assert (out / "e2e_throughput.png").stat().st_size > 0 and (out / "e2e_latency.png").stat().st_size > 0


def test_model_checkpoint_with_act_order(tmp_path):
    """--model: a tiny synthetic GPTQ checkpoint (HF layout, desc_act, GQA) loads, is shuffled as
    vLLM does, and its variants agree with its dequantized fp16 twin."""
    spec = _tiny(name="llama3-8b", vocab=320)
    ckpt = tmp_path / "tiny-gptq"
    e2e.write_synthetic_checkpoint(str(ckpt), spec, seed=5, act_order=True)
    loaded, quant, dense = e2e.load_checkpoint(str(ckpt), "cpu")
    assert (loaded.hidden, loaded.kv_heads, loaded.layers, loaded.vocab) == (spec.hidden, spec.kv_heads, 2, 320)
    assert quant.layers[0].qkv.perm.numel() == spec.hidden  # act-order: argsort(g_idx) kept for the gemm
    out = tmp_path / "e2e"
    assert e2e.main(["--model", str(ckpt), "--device", "cpu", "--no-progress", "--variants", "baseline,default",
                     "--num-prompts", "4", "--batch-size", "4", "--max-input", "24", "--max-output", "6",
                     "--repeats", "1", "--accuracy-prompts", "4", "--accuracy-steps", "6", "--out", str(out)]) == 0
    report = json.loads((out / "bench_e2e.json").read_text())
    _check_report(report, ["tiny-gptq"], ["fp16", "baseline", "default"])
    assert report["models"][0]["source"] == str(ckpt)


def test_dataset_lengths(tmp_path):
    data = [{"id": str(i), "conversations": [{"from": "human", "value": "word " * (10 + i)},
                                              {"from": "gpt", "value": "reply " * (20 + i)}]} for i in range(12)]
    data.append({"id": "short", "conversations": [{"from": "human", "value": "hi"}]})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    pairs = e2e.dataset_lengths(str(path), 5, seed=0)
    assert len(pairs) == 5
    for p, o in pairs:
        assert 4 <= p <= 1024 and 4 <= o and p + o <= 2048
    assert e2e.approx_tokens("abcd" * 10) == 10 and e2e.approx_tokens("漢字") == 2


def test_graph_mode_generate_matches_eager():
    """generate()'s graph path (replays only; state advanced inside the step) gives the eager tokens.
    A stand-in graph replays decode_step for its key, as a captured CUDA graph does on GPUs."""

    class Replay:
        def __init__(self, engine, key):
            self.engine, self.key = engine, key

        def replay(self):
            self.engine.decode_step(*self.key)

    spec = _tiny("qwen1.5-1.8b", vocab=200)
    quant, _ = e2e.random_weights(spec, "cpu", 4, 5.0)
    engine = e2e.Engine(spec, 6, 48, 10, "cpu")
    engine.use(quant, "baseline")
    batch = e2e.make_batch([(7, 3), (12, 9), (5, 1), (9, 6), (3, 9), (10, 2)], spec.vocab, 1, "cpu", 16, 6, 48)
    with torch.no_grad():
        eager = engine.generate(batch)["tokens"]
        graphs = {key: Replay(engine, key) for key in batch.keys()}
        replayed = engine.generate(batch, graphs=graphs)["tokens"]
    for r, o in enumerate(batch.out_lens):
        assert torch.equal(eager[r, :o], replayed[r, :o])
