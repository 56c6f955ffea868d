"""benchmarks/gpu_check.py cannot rot unnoticed: its --smoke mode runs every section on the CPU at toy sizes
(the same code paths as on a GPU, with the "cpu" and "torch" backends standing in for "triton" and "cuda")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_cpu-smoke.json").read_text())
    rows = data["rows"]
    assert {r["section"] for r in rows} == {"gemm", "multi", "stats", "model"}
    assert all(r["status"] == "OK" for r in rows), [r for r in rows if r["status"] != "OK"]
    by_case = {r["case"]: r for r in rows}
    gemm = [r for r in rows if r["section"] == "gemm" and "M" in r]
    assert gemm and all(r["F.linear_ms"] > 0 and r["dense_mask_ms"] > 0 and r["cpu_ms"] > 0 for r in gemm)
    assert all("cpu_ms" in r and "torch_ms" in r for r in rows if r["section"] == "multi")
    calib = by_case["calibration throughput (plain / collect_stats / hooks)"]
    assert calib["plain_tok_s"] > 0 and calib["ours_tok_s"] > 0 and calib["hooks_tok_s"] > 0
    gen = by_case["generate tok/s (unpatched / patched / merged)"]
    assert gen["unpatched_tok_s"] > 0 and gen["patched_tok_s"] > 0 and gen["merged_tok_s"] > 0
    assert by_case["set_persona latency"]["set_persona_us_median"] > 0
    assert by_case["generate, mixed-persona batch (persona_batch) vs base batch"]["mixed_batch_tok_s"] > 0
    md = (tmp_path / "gpu_cpu-smoke.md").read_text()
    for section in ("## gemm", "## multi", "## stats", "## model"):
        assert section in md


def test_gpu_check_without_gpu_and_without_smoke_measures_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "no CUDA device" in proc.stdout
    assert not list(tmp_path.iterdir())
