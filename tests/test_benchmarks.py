"""The device benchmark suite in its CPU profile: the script a GPU session runs cannot rot unnoticed."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--cpu", "--small", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def test_gpu_suite_small_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "suite"
    result = run_suite(out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "suite.json").read_text())
    dtp = [row for row in data["encoders"] if row["model"].startswith("dtp")]
    assert {row["mode"] for row in dtp} == {"train", "infer"}
    assert all(row["flop_x"] > 1 and row["time_x"] > 0 and row["peak_mb"] > 0 for row in dtp)
    scores = data["attention"]["scores"]
    assert scores["needed"] < scores["padded"] and set(data["attention"]["ms"]) == {"buckets", "padded"}
    assert {row["method"] for row in data["merge"]} == {"tome r=2", "lgtm r=2", "baseline"}
    llava = list(data["llava"].values())
    assert llava[1]["tokens_per_image"] < llava[0]["tokens_per_image"]  # the DTP tower passes fewer tokens
    assert all(r["samples_per_s"] > 0 for r in data["clip"].values())
    assert set(data["int8"]["seconds"]) == {"fp32", "fake W8A8", "int8 W8A8"} and data["int8"]["kernel"] == "onednn"
    assert data["int8"]["agreement"] < data["int8"]["fake_error"]
    table = (out / "suite.md").read_text()
    for heading in ("## Encoders", "## Attention", "## Token merging", "## LLaVA", "## CLIP", "## W8A8", "## Goals"):
        assert heading in table

    again = run_suite(out)
    assert again.returncode != 0 and "already holds a suite run" in again.stderr
