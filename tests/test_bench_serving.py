"""The serving benchmark runs end to end (--smoke: tiny model, no compile)
and its providers agree with each other before anything is timed."""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_serving  # noqa: E402


def test_smoke(tmp_path):
    out = tmp_path / "serving.json"
    assert bench_serving.main(["--smoke", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    names = {r["provider"] for r in doc["latency"]}
    assert {"dense eager", "canet eager smallest", "canet eager max",
            "canet eager mix-beauty", "canet-model max"} <= names
    assert all(r["p50_ms"] > 0 and r["requests"] == 5 for r in doc["latency"])
    assert doc["dense_anchor"] == "dense eager"
    assert {"dense eager", "canet eager mix-beauty"} <= set(doc["load"])
    assert all(r["throughput_rps"] > 0 for r in doc["load"].values())
    assert "load_average" in doc and len(doc["top_k_max_route"]) == 10
