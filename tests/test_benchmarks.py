"""The benchmark providers compute what canet computes (so no baseline is
timed doing something else), and the suite runs end to end (--smoke)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import providers as P  # noqa: E402
from canet_kernels import flops as FL  # noqa: E402

D, LAYERS = 32, 3
ROUTED = ("masked", "loop", "bucket", "canet-cpu")


def small_batch(all_max=False):
    # odd lengths, a length-1 sample, every width and depth mixed
    lengths = torch.tensor([7, 1, 5, 7, 3, 6, 2, 7])
    if all_max:
        widths, depths = torch.full((8,), D), torch.full((8,), LAYERS)
    else:
        widths = torch.tensor([32, 16, 24, 32, 8, 16, 24, 32])
        depths = torch.tensor([3, 1, 2, 1, 3, 2, 3, 2])
    return P.make_batch(widths, depths, 7, D, lengths=lengths)


@pytest.fixture(scope="module")
def weights():
    return P.make_weights(D, LAYERS, heads=4, seed=3)


def reference(W, batch):
    ref = P.reference_provider()
    return ref.padded(P.run_forward(ref, W, batch), batch)


def padded_out(name, W, batch):
    provs, _ = P.backbone_providers("cpu", [name])
    p = provs[name]
    return p.padded(P.run_forward(p, W, batch), batch) * batch.valid()


@pytest.mark.parametrize("name", ROUTED)
def test_backbone_matches_reference(weights, name):
    batch = small_batch()
    want = reference(weights, batch)
    got = padded_out(name, weights, batch)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{name}: max abs error {err:.3g} against the reference"


def test_dense_matches_reference_at_max_route(weights):
    batch = small_batch(all_max=True)
    want = reference(weights, batch)
    got = padded_out("dense", weights, batch)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"dense: max abs error {err:.3g} at the max route"


def _grads(name, W, batch):
    provs, _ = P.backbone_providers("cpu", [name])
    p = provs[name] if name != "reference" else P.reference_provider()
    Wt = P.trainable(W)
    out = p.padded(p.forward(Wt, batch), batch) * batch.valid()
    out.square().sum().backward()
    return [t.grad for t in P.weight_tensors(Wt)]


@pytest.mark.parametrize("name", ROUTED)
def test_backbone_gradients_match_reference(weights, name):
    batch = small_batch()
    want = _grads("reference", weights, batch)
    got = _grads(name, weights, batch)
    for i, (g, w) in enumerate(zip(got, want)):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        err = (g - w).abs().max().item()
        assert err < 1e-3 * (1 + w.abs().max().item()), \
            f"{name}: weight tensor {i} gradient error {err:.3g}"


@pytest.mark.parametrize("op", FL.OPS)
@pytest.mark.parametrize("name", ("masked", "loop", "bucket", "canet-cpu"))
def test_ops_match_reference(weights, op, name):
    batch = small_batch()
    res = P.make_batch(batch.widths, batch.depths, 7, D, lengths=batch.lengths, seed=9).x
    case = P.OpCase(op, weights["layers"][0], batch, res)
    st = case.prepare("reference")
    want = case.to_padded("reference", st, case.call("reference", st))
    st = case.prepare(name, grad=True)
    out = case.call(name, st)
    P.op_loss(out).backward()       # the training step runs too
    got = case.to_padded(name, st, [o.detach() for o in out] if isinstance(out, list)
                         else out.detach())
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"{op} / {name}: max abs error {err:.3g}"


def test_flop_ratio_counts():
    # one sample at full width and depth is the dense model
    assert FL.backbone_flops([50], [128], [8]) == FL.dense_flops(1, 50, 128, 8)
    # projections + FFN scale with w^2, attention with w
    n, w = 10, 64
    assert FL.layer_flops(n, w) == 24 * n * w * w + 4 * (n * (n + 1) / 2) * w


def test_kernel_family_counts_split_the_stack():
    # the per-kernel split of the GPU profile sums to the stack's counts
    lengths, widths, depths = [7, 50, 1, 33], [64, 128, 96, 64], [2, 8, 1, 4]
    fam = FL.stack_kernel_counts(lengths, widths, depths, elem_size=2)
    assert set(fam) == set(FL.KERNEL_FAMILIES)
    assert sum(f for f, _ in fam.values()) == pytest.approx(
        FL.backbone_flops(lengths, widths, depths))
    assert sum(b for _, b in fam.values()) == pytest.approx(
        FL.backbone_bytes(lengths, widths, depths, 2))
    # one sample, one layer: the core's FLOPs are the causal score pairs
    one = FL.stack_kernel_counts([10], [64], [1], elem_size=2)
    assert one["attention core"][0] == 4 * 55 * 64
    assert one["add + LayerNorm"][0] == 0


def test_route_mix_json(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"routes": [{"hidden": 64, "depth": 2, "share": 3},
                                           {"hidden": 128, "depth": 8, "share": 1}]}))
    mix = P.load_route_mix(str(path))
    assert mix == {(64, 2): 0.75, (128, 8): 0.25}
    w, d = P.sample_routes(64, mix)
    assert set(w.tolist()) <= {64, 128} and set(d.tolist()) <= {2, 8}


def test_route_mix_from_route_counts(tmp_path):
    # counts indexed like CANetConfig.routes(): emb x hidden x depth
    cfg = dict(emb_widths=[32, 64], hidden_widths=[32, 64], depths=[1, 2])
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"config": cfg, "route_counts": [1, 0, 0, 2, 1, 0, 0, 4]}))
    assert P.load_route_mix(str(path)) == {(32, 1): 0.25, (64, 2): 0.75}
    path.write_text(json.dumps({"config": cfg, "route_counts": [1, 2]}))
    with pytest.raises(ValueError, match="route counts"):
        P.load_route_mix(str(path))
    # a printed table is no route mix: JSON only
    path.write_text("route  emb  hidden  depth  flop-ratio   users   share\n")
    with pytest.raises(ValueError):
        P.load_route_mix(str(path))

def test_suite_smoke(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "results_cpu.json").read_text())
    errors = [row for row in doc["rows"] if row.get("error")]
    assert not errors, errors
    sections = {row["section"] for row in doc["rows"]}
    assert {"model", "ops", "padding", "memory", "serving"} <= sections
    provs = {row["provider"] for row in doc["rows"] if row["section"] == "model"}
    assert {"dense", "masked", "loop", "bucket", "canet-cpu"} <= provs
    assert (out / "results_cpu.csv").exists()
    assert (out / "latest.md").read_text().startswith("### canet benchmarks on")


TRITON_SCRIPT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from benchmarks import providers as P
import test_benchmarks as T
W = P.make_weights(T.D, 1, heads=4, seed=3)
b = T.small_batch()
b.depths.clamp_(max=1)
provs, skipped = P.backbone_providers("cpu", ["canet-triton"])
assert "canet-triton" in provs, skipped
p = provs["canet-triton"]
want = T.reference(W, b)
got = p.padded(P.run_forward(p, W, b), b) * b.valid()
assert (got - want).abs().max().item() < 1e-4
g_ref = T._grads("reference", W, b)
Wt = P.trainable(W)
(p.padded(p.forward(Wt, b), b) * b.valid()).square().sum().backward()
for t, r in zip(P.weight_tensors(Wt), g_ref):
    assert (t.grad - r).abs().max().item() < 1e-3 * (1 + r.abs().max().item())
print("ok")
"""


def test_triton_provider_in_interpreter():
    """The canet-triton provider (launchers + their autograd) on CPU tensors
    under TRITON_INTERPRET=1, against the reference."""
    pytest.importorskip("triton")
    code = TRITON_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_compiled_providers_match_eager(weights):
    """dense-compile (both modes) and bucket-compile (torch.compile, inductor's
    C++ backend on the CPU) compute what eager dense and bucket compute, and
    a compiled training step (forward, backward, AdamW) lands on the same
    weights as the eager one. One test: the first compiles take 20-60 s on a
    loaded 2-core machine (seconds once inductor's cache is warm)."""
    ok, why = P.compile_available("cpu")
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    batch = small_batch()
    full = P.make_batch(torch.full((4,), D), torch.full((4,), LAYERS), 7, D, seed=5)
    with torch.no_grad():
        want = P.dense_stack(full.x, weights)
        for mode in P.COMPILE_MODES:
            got = P.DenseCompiled(mode).forward(weights, full)
            err = (got - want).abs().max().item()
            assert err < 1e-5, f"dense-compile {mode}: max abs error {err:.3g}"
        eager, comp = P.Bucket(), P.BucketCompiled()
        want = eager.padded(eager.forward(weights, batch), batch) * batch.valid()
        got = comp.padded(comp.forward(weights, batch), batch) * batch.valid()
        err = (got - want).abs().max().item()
        assert err < 1e-5, f"bucket-compile: max abs error {err:.3g}"
    # every provider of backbone_providers is registered and reports itself
    provs, skipped = P.backbone_providers("cpu", ["dense-compile", "bucket-compile",
                                                  "dense-compile-graphs"])
    assert set(provs) == {"dense-compile", "bucket-compile"}
    assert "CUDA" in skipped["dense-compile-graphs"]

    def trained(make_loss):
        W = P.trainable(weights)
        x = full.x.detach().clone().requires_grad_()
        step = P.TrainStep(make_loss(W, x), W, extra=[x])
        loss = step().item()
        moved = max((a - b).abs().max().item() for a, b in
                    zip(P.weight_tensors(W), P.weight_tensors(weights)))
        return loss, [t.grad for t in P.weight_tensors(W)] + [x.grad], moved

    # gradients, not the stepped weights: Adam turns the rounding noise of a
    # zero gradient (the key bias's) into a full step of either sign
    want_l, want_g, moved = trained(lambda W, x: (lambda: P._dense_loss(x, W)))
    got_l, got_g, _ = trained(lambda W, x: P.DenseCompiled().loss_fn(W, x))
    assert moved > 0                                   # the optimizer stepped
    assert abs(got_l - want_l) < 1e-5 * (1 + abs(want_l))
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        err = (g - w).abs().max().item()
        assert err < 1e-5 * (1 + w.abs().max().item()), \
            f"gradient {i} of a compiled training step: error {err:.3g}"


def test_bench_triton_smoke_reports_fastest_dense(tmp_path):
    """bench_triton --smoke (CPU, interpreter) on its smallest scenario: the
    compiled dense and bucket variants run, the CUDA-graph ones are listed as
    unavailable with a reason, every ratio is against the fastest dense
    variant, and the keys gpu_check.sh's summary reads are there."""
    pytest.importorskip("triton")
    out = tmp_path / "triton.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_triton.py"),
                        "--smoke", "--only", "latency", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["compile_mode"] == "default"
    res = doc["results"]["latency"]
    assert not res["errors"], res["errors"]
    assert {"routed", "dense", "dense-compile", "routed-compile", "bucket",
            "bucket-compile"} <= set(res["providers"])
    assert all("CUDA" in why for why in res["unavailable"].values())
    assert "routed-graphs" in res["unavailable"]
    assert res["best_dense"]["name"] in ("dense", "dense-compile")
    assert min(res["over_best_dense"][n] for n in ("dense", "dense-compile")) == 1.0
    assert max(res["max_abs_diff_vs_eager"][n] for n in ("dense-compile", "routed-compile",
                                                         "bucket-compile")) < 1e-5
    for key in ("routed_over_dense", "routed_flop_ratio", "routed_over_best_dense",
                "over_flop_ratio", "target", "meets_target"):
        assert key in res, key
    assert res["meets_target"] is None            # its target reads routed-graphs
    assert "fastest dense" in r.stdout and "unavailable: CUDA graphs" in r.stdout
    # past --deadline the compiled variants are skipped, the rest still run
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_triton.py"),
                        "--smoke", "--only", "latency", "--deadline", "0", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["latency"]
    assert {"routed", "dense", "bucket"} == set(res["providers"])
    assert "deadline" in res["unavailable"]["dense-compile"]
    # the stream of batches with new routes: what runs without recompiling
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_triton.py"),
                        "--smoke", "--only", "training_stream", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["training_stream"]
    assert {"routed", "routed-compile", "bucket", "dense-compile"} <= set(res["providers"])
    assert "recompiles" in res["unavailable"]["bucket-compile"] and res["batches"] == 3


def test_bench_triton_kernel_families():
    # the GPU profile's split: kernel names to families, achieved rates
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_triton as BT
    assert BT.family_of("_ffn_fwd_kernel") == "FFN"
    assert BT.family_of("_attn_dkdv_kernel") == "backward: attention"
    assert BT.family_of("triton_per_fused_add_native_layer_norm_0") == "inductor fused"
    assert BT.family_of("void at::native::vectorized_layer_norm_kernel<c10::BFloat16>") \
        == "LayerNorm (library)"
    assert BT.family_of("cudaMemcpyAsync").startswith("other")
    # cuDNN's flash kernels name their architecture like the GEMMs do
    assert BT.family_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") \
        == "attention (library)"
    assert BT.family_of("nvjet_sm90_tst_128x160_64x5_1x2_h_bz_coopA_bias_TNT") \
        == "GEMM (library)"
    per = {"_mm_kernel": (0.5, 16), "_ffn_fwd_kernel": (1.0, 8), "_plan_kernel": (0.1, 32)}
    fam = BT.families(per, {"FFN": (2e12, 1e9)}, dict(matmul_tflop_s=800.0, copy_tb_s=4.0))
    assert list(fam) == ["FFN", "attention projections", "tile plans"]
    ffn = fam["FFN"]
    assert ffn["tflop_s"] == pytest.approx(2000.0) and ffn["tb_s"] == pytest.approx(1.0)
    assert ffn["of_peak_flop"] == pytest.approx(2.5) and ffn["of_peak_bw"] == pytest.approx(0.25)
    assert "tflop_s" not in fam["tile plans"]
