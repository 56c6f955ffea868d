"""Writers of a suite run: JSON, a markdown report and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from persona_kernels.bench.common import machine_line
from persona_kernels.utils.atomic import atomic_write


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomic write of a result file (persona_kernels.utils.atomic)."""
    atomic_write(path, data)


def _json_default(obj: Any):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


def write_json(result: Mapping[str, Any], path: Path) -> Path:
    atomic_write_bytes(path, (json.dumps(result, indent=1, default=_json_default) + "\n").encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------- markdown
def _ms(sec: float) -> str:
    return f"{sec * 1e3:.3g}" if sec < 10 else f"{sec * 1e3:.0f}"


def _ratio_cell(row: Mapping[str, Any], name: str) -> str:
    r = row["ratios"].get(name)
    return "-" if r is None else f"{r['value']:.3g}x ±{100 * r['noise'] / 2:.0f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: the header cells, the separator, one line per row of cells."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def _gated_md(sec: Mapping[str, Any]) -> list[str]:
    backends = sec.get("backends", [])
    small = sec.get("small_m", 16)
    cols = ["plain", "dense", *backends]
    header = ["N x K", "dtype", "M", "γ", *(f"{c} ms" for c in cols), "dense / plain",
              *(f"{b} / plain" for b in backends), *(f"{b} / dense" for b in backends),
              "throughput plain → " + "/".join(backends)]
    rows = []
    for row in sec["rows"]:
        p = row["params"]
        unit, key = ("GB/s", "gb_per_s") if p["M"] <= small else ("GFLOP/s", "gflop_per_s")
        met = row.get("metrics", {})
        thr = " → ".join(f"{met[c][key]:.3g}" for c in ["plain", *backends] if c in met) + f" {unit}"
        rows.append([f"{p['N']}x{p['K']}", p["dtype"], f"{p['M']}", f"{p['gamma']:g}",
                     *(_ms(row["times"][c]["median_s"]) if c in row["times"] else "-" for c in cols),
                     *(_ratio_cell(row, f"{b}/plain") for b in ["dense", *backends]),
                     *(_ratio_cell(row, f"{b}/dense") for b in backends), thr])
    return markdown_table(header, rows)


def _calibration_md(sec: Mapping[str, Any]) -> list[str]:
    header = ["model", "batch", "texts", "tokens (padded)", "plain s", "whole s", "stats s",
              "hooks s (1 text at a time)", "stats overhead, whole / plain", "hooks / stats"]
    rows = []
    for row in sec["rows"]:
        p, t = row["params"], row["times"]
        over, sp = row["ratios"]["whole/plain"], row["ratios"]["stats/hooks"]
        rows.append([f"{p['model']}", f"{p['batch_size']}", f"{p['texts']}", f"{p['tokens']} ({p['padded_tokens']})",
                     *(f"{t[m]['median_s']:.3f}" for m in ("plain", "whole", "stats", "hooks")),
                     f"{100 * (over['value'] - 1):+.1f} % ±{50 * over['noise']:.0f}%",
                     f"{1 / sp['value']:.2f}x ±{50 * sp['noise']:.0f}%"])
    lines = markdown_table(header, rows)
    if sec.get("check"):
        lines += ["", f"Cross-check: max relative difference of per-channel RMS, collect_stats vs hooks: "
                      f"{sec['check'].get('max_rel_diff_rms', float('nan')):.1e}."]
    return lines


def _ratio_or(row: Mapping[str, Any], name: str, fmt: str, invert: bool = False) -> str | None:
    """``fmt % value`` of a ratio (``1 / value`` with ``invert``), None when the row has no such ratio."""
    r = row["ratios"].get(name)
    return None if r is None else fmt % (1 / r["value"] if invert else r["value"])


def _scoring_md(sec: Mapping[str, Any]) -> list[str]:
    lines = []
    for row in sec["rows"]:
        p = row["params"]
        lines += [f"{p['modules']} modules ({p['layers']} layers), {p['weights'] / 1e6:.1f}M weights, sparsity {p['sparsity']}.",
                  ""]
        lines += markdown_table(["method", "seconds", "speed-up vs per-row loop"],
                        [[m, f"{t['median_s']:.3f}", _ratio_or(row, f"{m}/loop_wanda_x2", "%.1fx", invert=True) or "1x"]
                         for m, t in row["times"].items()])
        lines += ["", f"Wanda weights differing from the loop (exact ties only): "
                      f"{row['metrics'].get('wanda_weights_differing_from_loop')}."]
    return lines


def _switching_md(sec: Mapping[str, Any]) -> list[str]:
    lines = []
    for row in sec["rows"]:
        if "times" in row:
            lines += markdown_table(["switch method", "ms per switch", "set_persona / method"],
                            [[m, f"{t['median_s'] * 1e3:.4g}", _ratio_or(row, f"set_persona/{m}", "%.2e") or "-"]
                             for m, t in row["times"].items()])
        else:
            lines += markdown_table(["storage per persona", "bytes", "MiB", "bits / weight", "bank file / this"],
                            [[m, f"{v}", f"{v / 2**20:.2f}", f"{row['metrics'][m + '_bits_per_weight']:.3f}",
                              _ratio_or(row, f"bank_file/{m}", "%.3f") or "-"] for m, v in row["values"].items()])
        lines.append("")
    return lines


def _e2e_md(sec: Mapping[str, Any]) -> list[str]:
    header = ["batch", "new tokens", "unpatched tok/s", "patched tok/s", "merged tok/s", "patched / unpatched time",
              "patched / merged time"]
    rows = []
    for row in sec["rows"]:
        p, m = row["params"], row["metrics"]
        rows.append([f"{p['batch_size']}", f"{p['new_tokens']}",
                     *(f"{m[c]['tokens_per_s']:.1f}" for c in ("unpatched", "patched", "merged")),
                     _ratio_cell(row, "patched/unpatched"), _ratio_cell(row, "patched/merged")])
    return markdown_table(header, rows)


_SECTION_MD = {"gated": _gated_md, "calibration": _calibration_md, "scoring": _scoring_md,
               "switching": _switching_md, "e2e": _e2e_md}


def markdown(result: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The markdown report of a run (``plots``: section -> PNG file name next to the report)."""
    info = result["machine"]
    lines = ["# persona_kernels benchmark suite", "",
             f"Machine: {machine_line(info)}. Clock: {result['config']['clock']}; {result['config']['repeats']} "
             f"interleaved repeats unless a section says otherwise; {info['date_utc']}; load average at start "
             f"{info.get('load_average')}.", "",
             f"Command: `{result['command']}`", "",
             "Ratios are medians of per-repeat time ratios measured in the same run (lower = the first method is "
             "faster / smaller); ± is half the relative inter-quartile range of the per-repeat ratios.", ""]
    for name, sec in result["sections"].items():
        lines += [f"## {sec.get('title', name)}", ""]
        if "error" in sec:
            lines += [f"Not run: {sec['error']}", ""]
            continue
        try:
            lines += _SECTION_MD[name](sec)
        except (KeyError, TypeError, ZeroDivisionError) as exc:  # a partial section: list what is there
            lines += [f"(table unavailable: {exc!r})"]
        if sec.get("skipped"):
            lines += ["", f"Skipped (time budget): {len(sec['skipped'])} cases."]
        for note in sec.get("notes", []):
            lines += ["", f"- {note}"] if note is sec["notes"][0] else [f"- {note}"]
        if plots and name in plots:
            lines += ["", f"![{name}]({plots[name]})"]
        lines.append("")
    if result.get("guard"):
        from persona_kernels.bench.guard import markdown as guard_md

        lines += ["## Regression guard", "", guard_md(result["guard"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _plot_gated(sec: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    rows = sec["rows"]
    order = {"float32": 0, "bfloat16": 1, "float16": 2}
    panels = sorted({(r["params"]["N"], r["params"]["K"], r["params"]["dtype"]) for r in rows},
                    key=lambda t: (t[0] * t[1], t[0], order.get(t[2], 9)))
    shapes = list(dict.fromkeys((n, k) for n, k, _ in panels))
    dtypes = list(dict.fromkeys(d for _, _, d in panels))
    fig, axes = plt.subplots(len(shapes), len(dtypes), figsize=(5 * len(dtypes), 3.2 * len(shapes)), squeeze=False)
    methods = ["dense", *sec.get("backends", [])]
    for i, (n, k) in enumerate(shapes):
        for j, d in enumerate(dtypes):
            ax = axes[i][j]
            sub = [r for r in rows if (r["params"]["N"], r["params"]["K"], r["params"]["dtype"]) == (n, k, d)]
            for gamma in sorted({r["params"]["gamma"] for r in sub}):
                pts = sorted((r for r in sub if r["params"]["gamma"] == gamma), key=lambda r: r["params"]["M"])
                for c, m in enumerate(methods):
                    xs = [r["params"]["M"] for r in pts if f"{m}/plain" in r["ratios"]]
                    ys = [r["ratios"][f"{m}/plain"]["value"] for r in pts if f"{m}/plain" in r["ratios"]]
                    if xs:
                        ax.plot(xs, ys, marker="o", color=f"C{c}", linestyle="-" if gamma == 0 else "--",
                                label=f"{m} γ={gamma:g}")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{n}x{k} {d}", fontsize=9)
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel("time / plain F.linear")
            ax.legend(fontsize=6)
    fig.suptitle("gated linear: time relative to F.linear (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _bars(ax, labels, values, ylabel, log=False):
    ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))])
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")


def _plot_other(name: str, sec: Mapping[str, Any], path: Path) -> None:
    plt = _plt()
    timed = [r for r in sec["rows"] if "times" in r]
    static = [r for r in sec["rows"] if "values" in r]
    panels = len(timed) + len(static)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    for ax, row in zip(axes[0], timed):
        if name == "e2e":
            labels = list(row["metrics"])
            _bars(ax, labels, [row["metrics"][m]["tokens_per_s"] for m in labels], "tokens / s")
        else:
            labels = list(row["times"])
            vals = [row["times"][m]["median_s"] for m in labels]
            _bars(ax, labels, vals, "seconds (median)", log=max(vals) > 20 * max(min(vals), 1e-12))
        ax.set_title(row["key"], fontsize=9)
    for ax, row in zip(axes[0][len(timed):], static):
        labels = list(row["values"])
        _bars(ax, labels, [row["values"][m] / 2**20 for m in labels], "MiB per persona", log=True)
        ax.set_title(row["key"], fontsize=9)
    fig.suptitle(sec.get("title", name), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_plots(result: Mapping[str, Any], out: Path) -> dict[str, str]:
    """One PNG per section that has rows; returns section -> file name."""
    written = {}
    for name, sec in result["sections"].items():
        if "error" in sec or not sec.get("rows"):
            continue
        path = out / f"{name}.png"
        out.mkdir(parents=True, exist_ok=True)
        if name == "gated":
            _plot_gated(sec, path)
        else:
            _plot_other(name, sec, path)
        written[name] = path.name
    return written


def write_all(result: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """results.json, report.md and the PNGs under ``out``."""
    out = Path(out)
    plots = write_plots(result, out)
    paths = {"json": write_json(result, out / "results.json"), "md": out / "report.md"}
    atomic_write_bytes(paths["md"], markdown(result, plots).encode("utf-8"))
    paths.update({k: out / v for k, v in plots.items()})
    return paths
