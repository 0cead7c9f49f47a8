"""bench/gpu.py stays alive on a CPU (tiny sizes): its JSON has every figure, sane,
and its projection is the stated arithmetic."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_projection_is_epochs_times_examples_over_rate_plus_a_suite():
    gpu = load_bench()
    corners = [(192, 2), (192, 8), (384, 2), (384, 8)]
    flat = gpu.project({c: 1000.0 for c in corners}, {c: 30.0 for c in corners}, 50_000, 40)
    assert flat["models"] == 2187
    assert flat["gpu_hours"] == pytest.approx(2187 * (40 * 50_000 / 1000.0 + 30.0) / 3600)
    # the rate halves with each doubling of the width: 768 (extrapolated) at a quarter of 192's
    rates = {(w, d): 1000.0 * 192 / w for w, d in corners}
    scaled = gpu.project(rates, {(192, 2): 0.0 + 1e-9}, 50_000, 40)
    per = scaled["seconds_per_model"]
    assert per["768x4"] == pytest.approx(4 * per["192x4"], rel=1e-6)
    assert per["384x8"] == pytest.approx(40 * 50_000 / 500.0, rel=1e-6)


def test_bench_gpu_runs_on_a_cpu_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--small",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "GPU-hours" in run.stderr.strip().splitlines()[-1]
    r = json.loads(out.read_text())
    assert r["small"] and r["device"] == "cpu" and r["precision"] == "fp32"
    assert {(c["width"], c["depth"]) for c in r["configs"]} == {(4, 2), (4, 8), (8, 2), (8, 8)}
    for c in r["configs"]:
        for key in ("train_images_per_s", "bare_torch_images_per_s", "eval_images_per_s"):
            assert math.isfinite(c[key]) and c[key] > 0
        assert c["fraction_of_bare"] == pytest.approx(
            c["train_images_per_s"] / c["bare_torch_images_per_s"])
        assert c["peak_memory_bytes"] is None          # no GPU
    (s,) = r["suites"]
    assert s["seconds"] > 0 and s["budget"] == "fast"
    assert sum(s["seconds_per_family"].values()) == pytest.approx(s["seconds"], rel=0.05)
    # measures needing a training trace cannot run on a synthetic model
    assert any(f.startswith("steps_to_0.1_loss") for f in s["failed"])
    p = r["projection"]
    assert p["models"] == 2187 and p["epochs_assumed"] == 40
    assert math.isfinite(p["gpu_hours"]) and p["gpu_hours"] > 0
    assert len(p["seconds_per_model"]) == 9
