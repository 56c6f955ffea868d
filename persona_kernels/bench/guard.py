"""Regression guard: compare a run with a saved baseline and flag ratios that got worse beyond the noise.

Only ratios marked ``guard`` are compared (ours over a reference, lower is better). A ratio is flagged when
``current / baseline - 1 > factor * (noise_current + noise_baseline) + floor``, the noises being the relative
inter-quartile ranges of the per-repeat ratios of each run.
"""

from __future__ import annotations

from typing import Any, Mapping


def compare(current: Mapping[str, Any], baseline: Mapping[str, Any], *, factor: float = 1.0,
            floor: float = 0.02) -> dict[str, Any]:
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
    return {"compared": compared, "flagged": flagged, "missing": missing, "factor": factor, "floor": floor}


def markdown(result: Mapping[str, Any]) -> str:
    """A table of the flagged rows (or a one-line all-clear)."""
    head = (f"Regression guard: {result['compared']} ratios compared, {len(result['flagged'])} flagged "
            f"(tolerance = {result['factor']:g} x (noise now + noise baseline) + {result['floor']:g}).")
    if not result["flagged"]:
        return head + "\n"
    lines = [head, "", "| section | case | ratio | baseline | now | change | tolerance |", "|---|---|---|---|---|---|---|"]
    for f in result["flagged"]:
        lines.append(f"| {f['section']} | {f['key']} | {f['ratio']} | {f['baseline']:.4g} | {f['current']:.4g} | "
                     f"{100 * f['change']:+.1f} % | {100 * f['tolerance']:.1f} % |")
    return "\n".join(lines) + "\n"
