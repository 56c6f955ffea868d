"""Tests of the benchmark suite's machinery (no timed assertions): timing helpers, regression guard,
report writers, and a tiny smoke run through the real code path."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch

from persona_kernels.bench import main
from persona_kernels.bench.common import machine_info
from persona_kernels.bench.guard import compare, markdown as guard_markdown
from persona_kernels.bench.report import markdown, write_all
from persona_kernels.bench.timing import Timing, quantile, ratio, relative_iqr, time_interleaved


# ------------------------------------------------------------------------------------------- timing
def test_quantile_and_relative_iqr():
    vals = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert quantile(vals, 0.0) == 1.0 and quantile(vals, 1.0) == 5.0
    assert quantile(vals, 0.5) == 3.0
    assert quantile(vals, 0.25) == 2.0 and quantile(vals, 0.75) == 4.0
    assert quantile([1.0, 2.0], 0.5) == pytest.approx(1.5)
    assert relative_iqr(vals) == pytest.approx(2.0 / 3.0)
    assert relative_iqr([7.0]) == 0.0
    with pytest.raises(ValueError, match="values"):
        quantile([], 0.5)
    with pytest.raises(ValueError, match="'q'"):
        quantile([1.0], 1.5)


def test_timing_median_and_noise_on_synthetic_samples():
    steady = Timing([1.00, 1.01, 0.99, 1.00, 1.02, 0.98, 1.00])
    noisy = Timing([1.0, 1.6, 0.7, 1.3, 0.9, 2.0, 1.1])
    assert steady.median == pytest.approx(1.0)
    assert steady.iqr == pytest.approx(steady.q3 - steady.q1)
    assert steady.noise < 0.03
    assert noisy.noise > 10 * steady.noise
    d = noisy.to_dict()
    assert d["median_s"] == pytest.approx(statistics.median(noisy.samples)) and d["samples_s"] == noisy.samples


def test_ratio_is_median_of_paired_ratios():
    # a machine slowing down affects both methods alike: the paired ratio stays 2 with no noise
    slow = [2.0, 4.0, 8.0, 2.2]
    fast = [1.0, 2.0, 4.0, 1.1]
    r = ratio(slow, fast)
    assert r.value == pytest.approx(2.0) and r.noise == pytest.approx(0.0)
    assert r.samples == pytest.approx([2.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="paired"):
        ratio([1.0, 2.0], [1.0])


def test_time_interleaved_rotates_order_and_counts_calls():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")}
    out = time_interleaved(fns, repeats=3, warmup=1, clock="process")
    assert set(out) == {"a", "b", "c"} and all(len(t.samples) == 3 for t in out.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # rotating order per repeat
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(fns, repeats=0)
    with pytest.raises(ValueError, match="clock"):
        time_interleaved(fns, repeats=1, clock="sundial")


# ------------------------------------------------------------------------------------- synthetic run
def _ratio(value: float, noise: float, guard: bool = True) -> dict:
    return {"value": value, "noise": noise, "samples": [value], "guard": guard}


def _times(**medians: float) -> dict:
    return {k: {"median_s": v, "q1_s": v, "q3_s": v, "noise": 0.0, "samples_s": [v, v]} for k, v in medians.items()}


def synthetic_result() -> dict:
    gated_rows = []
    for m in (1, 64):
        for gamma in (0.0, 0.5):
            gated_rows.append({
                "key": f"64x172|float32|M={m}|gamma={gamma:g}",
                "params": {"model": "tiny", "N": 64, "K": 172, "M": m, "dtype": "float32", "gamma": gamma},
                "times": _times(plain=1e-4 * m, dense=3e-4 * m, cpu=1.1e-4 * m),
                "ratios": {"dense/plain": _ratio(3.0, 0.05, False), "cpu/plain": _ratio(1.1, 0.05),
                           "cpu/dense": _ratio(0.37, 0.05, False)},
                "metrics": {k: {"gb_per_s": 1.0, "gflop_per_s": 2.0} for k in ("plain", "dense", "cpu")},
            })
    return {
        "suite": "persona_kernels.bench", "format_version": 1, "command": "synthetic",
        "machine": machine_info(torch.device("cpu")),
        "config": {"device": "cpu", "quick": True, "tiny": True, "repeats": 2, "clock": "process"},
        "sections": {
            "gated": {"title": "gated", "backends": ["cpu"], "small_m": 16, "rows": gated_rows, "notes": ["n"]},
            "calibration": {"title": "calibration", "rows": [{
                "key": "m|batch=4", "params": {"model": "m", "batch_size": 4, "texts": 8, "tokens": 80, "padded_tokens": 96},
                "times": _times(plain=1.0, whole=1.02, stats=0.98, hooks=3.0),
                "ratios": {"whole/plain": _ratio(1.02, 0.01), "stats/hooks": _ratio(0.33, 0.01)}}],
                "check": {"max_rel_diff_rms": 1e-6}},
            "scoring": {"title": "scoring", "rows": [{
                "key": "s", "params": {"layers": 1, "modules": 7, "weights": 4e6, "rows": 5000, "sparsity": 0.5},
                "times": _times(wanda_x2=0.1, loop_wanda_x2=2.0),
                "ratios": {"wanda_x2/loop_wanda_x2": _ratio(0.05, 0.02)},
                "metrics": {"wanda_weights_differing_from_loop": 0}}]},
            "switching": {"title": "switching", "rows": [
                {"key": "sw", "params": {}, "times": _times(set_persona=1e-4, reload_safetensors=0.1),
                 "ratios": {"set_persona/reload_safetensors": _ratio(1e-3, 0.1)}},
                {"key": "memory per persona", "params": {}, "values": {"bank_file": 100, "pickled_bool_masks": 800},
                 "ratios": {"bank_file/pickled_bool_masks": _ratio(0.125, 0.0)},
                 "metrics": {"bank_file_bits_per_weight": 1.0, "pickled_bool_masks_bits_per_weight": 8.0}}]},
            "e2e": {"title": "e2e", "rows": [{
                "key": "e|batch=1", "params": {"batch_size": 1, "new_tokens": 4},
                "times": _times(unpatched=1.0, patched=1.1, merged=1.0),
                "ratios": {"patched/unpatched": _ratio(1.1, 0.02), "patched/merged": _ratio(1.1, 0.02)},
                "metrics": {k: {"tokens_per_s": 4.0} for k in ("unpatched", "patched", "merged")}}]},
            "broken": {"title": "broken", "error": "RuntimeError: no model"},
        },
    }


def test_guard_flags_a_regression_and_not_noise():
    base = synthetic_result()
    # noise only: every guarded ratio moves by less than the measured noise (+ floor)
    jitter = copy.deepcopy(base)
    for sec in jitter["sections"].values():
        for row in sec.get("rows", []):
            for r in row["ratios"].values():
                r["value"] *= 1.0 + 0.5 * r["noise"]
    res = compare(jitter, base)
    assert res["compared"] == 11 and res["flagged"] == [] and res["missing"] == []
    assert "0 flagged" in guard_markdown(res)
    # a real regression of the cpu backend at M=1, plus an unguarded ratio getting worse (ignored)
    worse = copy.deepcopy(base)
    row = worse["sections"]["gated"]["rows"][0]
    row["ratios"]["cpu/plain"]["value"] = 2.0
    row["ratios"]["dense/plain"]["value"] = 30.0
    res = compare(worse, base)
    assert [(f["section"], f["key"], f["ratio"]) for f in res["flagged"]] == [("gated", row["key"], "cpu/plain")]
    assert res["flagged"][0]["change"] == pytest.approx(2.0 / 1.1 - 1)
    table = guard_markdown(res)
    assert "| gated | 64x172\\|float32\\|M=1\\|gamma=0 | cpu/plain |" in table
    # the same change is within tolerance when both runs were noisy enough
    for r in (row["ratios"]["cpu/plain"], base["sections"]["gated"]["rows"][0]["ratios"]["cpu/plain"]):
        r["noise"] = 0.5
    assert compare(worse, base)["flagged"] == []
    # improvements are never flagged; rows absent from the baseline are listed as missing
    better = copy.deepcopy(synthetic_result())
    better["sections"]["gated"]["rows"][0]["ratios"]["cpu/plain"]["value"] = 0.5
    better["sections"]["gated"]["rows"][1]["key"] = "new shape"
    res = compare(better, synthetic_result())
    assert res["flagged"] == [] and len(res["missing"]) == 1 and res["warnings"] == []
    other = synthetic_result()
    other["machine"]["cpu_model"] = "another CPU"
    res = compare(other, synthetic_result())
    assert res["warnings"] == ["machine cpu_model differs: now 'another CPU', baseline " + repr(synthetic_result()["machine"]["cpu_model"])]
    assert "Not like for like" in guard_markdown(res)


def test_report_writer_produces_json_markdown_and_pngs(tmp_path):
    result = synthetic_result()
    result["guard"] = compare(result, result)
    paths = write_all(result, tmp_path)
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["sections"]["gated"]["rows"][0]["key"] == result["sections"]["gated"]["rows"][0]["key"]
    md = (tmp_path / "report.md").read_text()
    for text in ("## gated", "## calibration", "## scoring", "## switching", "## e2e", "Not run: RuntimeError",
                 "![gated](gated.png)", "AMD" if "AMD" in result["machine"]["cpu_model"] else "Machine:",
                 "Regression guard", "stats overhead, whole / plain |", "| +2.0 % ±0% | 3.03x ±0% |"):
        assert text in md, text
    assert md == markdown(result, {k: f"{k}.png" for k in ("gated", "calibration", "scoring", "switching", "e2e")})
    for name in ("gated", "calibration", "scoring", "switching", "e2e"):
        png = tmp_path / f"{name}.png"
        assert paths[name] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "broken.png").exists()


# ------------------------------------------------------------------------------------------ smoke run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["--tiny", "--sections", "gated", "--threads", "1", "--repeats", "2", "--no-progress",
                 "--out", str(out), "--save-baseline"])
    return code, out


def test_tiny_gated_run_writes_everything(tiny_run):
    code, out = tiny_run
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert (out / "baseline.json").is_file() and (out / "gated.png").is_file() and (out / "report.md").is_file()
    sec = result["sections"]["gated"]
    assert "cpu" in sec["backends"] or "torch" in sec["backends"]
    assert [r["params"]["M"] for r in sec["rows"]] == [1, 8]
    for row in sec["rows"]:
        for b in sec["backends"]:
            assert row["ratios"][f"{b}/plain"]["value"] > 0 and row["ratios"][f"{b}/plain"]["guard"]
            assert row["metrics"][b]["gb_per_s"] > 0
        assert len(row["times"]["plain"]["samples_s"]) == 2
    assert result["machine"]["cpu_isa"] and result["config"]["clock"] == "process"


def test_baseline_regression_exits_1(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    baseline = json.loads((out / "results.json").read_text())
    for row in baseline["sections"]["gated"]["rows"]:  # pretend the kernels used to be 1000x faster
        for r in row["ratios"].values():
            r["value"] /= 1000.0
            r["noise"] = 0.0
    path = tmp_path / "old.json"
    path.write_text(json.dumps(baseline))
    code = main(["--tiny", "--sections", "gated", "--threads", "1", "--repeats", "2", "--no-progress",
                 "--out", str(tmp_path / "run"), "--baseline", str(path)])
    assert code == 1
    assert "flagged" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["guard"]["flagged"]


def test_bad_arguments():
    assert main(["--sections", "gated,nope"]) == 2
    assert main(["--repeats", "0"]) == 2
    assert main(["--baseline", "/nonexistent/file.json", "--sections", "gated"]) == 2
