"""Regression guard: compare a run with a saved baseline and flag ratios that got worse beyond the noise.

Only ratios marked ``guard`` are compared (ours over a reference, lower is better). A ratio is flagged when
``current / baseline - 1 > factor * (noise_current + noise_baseline) + floor``, the noises being the relative
inter-quartile ranges of the per-repeat ratios of each run (defaults: factor 2, floor 0.05; a few repeats
underestimate the spread between runs on a shared machine, hence the margin).
"""

from __future__ import annotations

from typing import Any, Mapping


def compare(current: Mapping[str, Any], baseline: Mapping[str, Any], *, factor: float = 2.0,
            floor: float = 0.05) -> dict[str, Any]:
    """Return ``{"compared": int, "flagged": [rows], "missing": [names]}``."""
    flagged, missing, compared = [], [], 0
    base_sections = baseline.get("sections", {})
    for section, sec in current.get("sections", {}).items():
        base = base_sections.get(section)
        if not isinstance(base, Mapping) or "rows" not in base or "rows" not in sec:
            continue
        base_rows = {r["key"]: r for r in base["rows"]}
        for row in sec["rows"]:
            brow = base_rows.get(row["key"])
            for name, r in row.get("ratios", {}).items():
                if not r.get("guard"):
                    continue
                b = None if brow is None else brow.get("ratios", {}).get(name)
                if b is None:
                    missing.append(f"{section}: {row['key']}: {name}")
                    continue
                compared += 1
                if not b["value"] > 0:
                    continue
                change = r["value"] / b["value"] - 1.0
                tolerance = factor * (float(r.get("noise", 0.0)) + float(b.get("noise", 0.0))) + floor
                if change > tolerance:
                    flagged.append({"section": section, "key": row["key"], "ratio": name, "baseline": b["value"],
                                    "current": r["value"], "change": change, "tolerance": tolerance})
    warnings = []
    for what, a, b in (("machine", current.get("machine", {}), baseline.get("machine", {})),
                       ("config", current.get("config", {}), baseline.get("config", {}))):
        for key in ("cpu_model", "gpu", "device", "torch_threads", "quick", "clock"):
            if key in a and key in b and a[key] != b[key]:
                warnings.append(f"{what} {key} differs: now {a[key]!r}, baseline {b[key]!r}")
    return {"compared": compared, "flagged": flagged, "missing": missing, "factor": factor, "floor": floor,
            "warnings": warnings}


def markdown(result: Mapping[str, Any]) -> str:
    """A table of the flagged rows (or a one-line all-clear)."""
    head = (f"Regression guard: {result['compared']} ratios compared, {len(result['flagged'])} flagged "
            f"(tolerance = {result['factor']:g} x (noise now + noise baseline) + {result['floor']:g}).")
    if result.get("warnings"):
        head += " Not like for like: " + "; ".join(result["warnings"]) + "."
    if not result["flagged"]:
        return head + "\n"
    lines = [head, "", "| section | case | ratio | baseline | now | change | tolerance |", "|---|---|---|---|---|---|---|"]
    for f in result["flagged"]:
        key = str(f["key"]).replace("|", "\\|")  # case keys hold pipes
        lines.append(f"| {f['section']} | {key} | {f['ratio']} | {f['baseline']:.4g} | {f['current']:.4g} | "
                     f"{100 * f['change']:+.1f} % | {100 * f['tolerance']:.1f} % |")
    return "\n".join(lines) + "\n"
