"""benchmarks/bench_scoring.py end to end on tiny sizes: memory children,
interleaved timing, the agreement check, the JSON and the table."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_scoring_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_scoring.py"), "--items", "700",
         "--batch", "4", "--seq-len", "6", "--eval-rows", "8", "--seen", "3", "--rounds", "1",
         "--chunk", "256", "--threads", "1", "--tag", "smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "bench_scoring_cpu_smoke.json").read_text())
    rows = {(r["mode"], r["provider"]): r for r in res["results"]}
    assert set(rows) == {("train", "fused"), ("train", "plain"), ("eval", "fused"),
                         ("eval", "plain")}
    for r in rows.values():
        assert r["memory"]["peak_bytes"] >= 0 and r["time"]["samples"] == 1
    assert rows[("train", "fused")]["agreement_with_plain"]["loss_rel_err"] < 1e-4
    assert "| train | 700 | fused |" in proc.stdout


def test_bench_scoring_deadline_skips_and_writes_json(tmp_path):
    # a deadline already past: no case starts, every row says why, the JSON is there
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_scoring.py"), "--items", "700",
         "--deadline", "0", "--tag", "dl", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "bench_scoring_cpu_dl.json").read_text())
    assert len(res["results"]) == 4
    assert all(r["skipped"] == "deadline" for r in res["results"])
    assert res["dtype"] == "float32" and res["device"] == "cpu"


def test_bench_scoring_cuda_without_device(tmp_path):
    import torch
    if torch.cuda.is_available():
        import pytest
        pytest.skip("a CUDA device is present")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_scoring.py"), "--device", "cuda",
         "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "no CUDA device" in proc.stderr
