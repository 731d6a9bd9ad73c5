"""The site's plots, inline SVG drawn here (no JavaScript library, nothing fetched): a model's
robustness against ε, and the index's clean-against-worst-case picture of every model. Every
mark carries a ``<title>`` with its numbers, so a screen reader or a tooltip gives them.
"""

from __future__ import annotations

import json
from typing import Optional

from markupsafe import Markup, escape

from .records import is_missing
from .table import page_name

# Colours of the robustness-vs-ε series (Tableau 10); further series repeat them dashed.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")


def robustness_svg(series: dict[str, list[tuple[float, float]]], clean: Optional[float], metric: str) -> Markup:
    """An inline SVG of ``metric`` (fractions) against ε (in /255), one series per attack:
    markers at the measured ε, joined by lines where an attack was run at several ε; the
    clean value as a dashed line at the top."""
    names = sorted(series)
    width, plot_w, height = 640, 330, max(240, 40 + 15 * len(names))
    left, top, plot_h = 46, 14, 190
    max_eps = max([e for points in series.values() for e, _ in points] + [1.0])
    x = lambda e: left + plot_w * e / (max_eps * 1.08)  # noqa: E731
    y = lambda v: top + plot_h * (1 - v)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(metric)} against epsilon">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" class="tick" text-anchor="end">{100 * tick:.0f}</text>')
    for tick in sorted({0.0} | {e for points in series.values() for e, _ in points}):
        parts.append(f'<text x="{x(tick):.1f}" y="{top + plot_h + 16}" class="tick" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" class="axis"/>'
                 f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" class="axis"/>'
                 f'<text x="{left + plot_w / 2}" y="{top + plot_h + 34}" class="label" text-anchor="middle">ε (/255)</text>'
                 f'<text x="12" y="{top + plot_h / 2}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 12 {top + plot_h / 2})">{escape(metric)} (%)</text>')
    if clean is not None and not is_missing(clean):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(clean):.1f}" y2="{y(clean):.1f}" class="clean">'
                     f'<title>clean {escape(metric)} {100 * clean:.1f}</title></line>')
    for i, name in enumerate(names):
        colour, dash = PALETTE[i % len(PALETTE)], ' stroke-dasharray="5 3"' if i >= len(PALETTE) else ""
        points = sorted(series[name])
        if len(points) > 1:
            coords = " ".join(f"{x(e):.1f},{y(v):.1f}" for e, v in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for e, v in points:
            parts.append(f'<circle cx="{x(e):.1f}" cy="{y(v):.1f}" r="4" fill="{colour}">'
                         f'<title>{escape(name)}, ε = {e:g}/255: {escape(metric)} {100 * v:.1f}</title></circle>')
        ly = top + 6 + 15 * i
        parts.append(f'<line x1="{left + plot_w + 16}" x2="{left + plot_w + 36}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                     f'stroke-width="3"{dash}/><text x="{left + plot_w + 42}" y="{ly + 4}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


#: defense name -> family, the colour of its point on the index's picture (anything else: "other")
DEFENSE_FAMILIES = {"none": "undefended", "at": "adversarial training", "goat": "adversarial training",
                    "goat-ce": "adversarial training", "goat-sma": "adversarial training",
                    "goat-fna": "adversarial training", "sadstrm": "adversarial training",
                    "cs": "input transform", "rrp": "input transform", "jpeg": "input transform",
                    "jad": "input transform + training", "jad-proactive": "input transform + training",
                    "apd": "generative", "ddid": "generative"}
FAMILY_COLOURS = {"undefended": "#555555", "adversarial training": "#4e79a7", "input transform": "#f28e2b",
                  "input transform + training": "#e15759", "generative": "#59a14f", "other": "#b07aa1"}


def defense_family(defense) -> str:
    """The family of a defense as the cells frame holds it (a name or a JSON description)."""
    name = defense
    if isinstance(defense, str) and defense.startswith("{"):
        try:
            name = json.loads(defense).get("name")
        except (ValueError, AttributeError):
            name = None
    elif isinstance(defense, dict):
        name = defense.get("name")
    return DEFENSE_FAMILIES.get(name, "other")


def robustness_map(rows: list[dict], title: str) -> Optional[Markup]:
    """An inline SVG of clean Rank-1 (x) against worst-case Rank-1 (y), one point per model
    with its 95% intervals as bars, coloured by defense family and linked to the model's page;
    the diagonal is 'no robustness lost'. None when no model has both numbers."""
    points = [r for r in rows if not is_missing(r.get("clean.rank1")) and not is_missing(r.get("standardized.rank1"))]
    if not points:
        return None
    width, height, left, top, size = 660, 380, 52, 16, 320
    x = lambda v: left + size * v  # noqa: E731
    y = lambda v: top + size * (1 - v)  # noqa: E731
    parts = [f'<svg class="plot map" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}: clean against worst-case Rank-1">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + size}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" class="grid"/>'
                     f'<line x1="{x(tick):.1f}" x2="{x(tick):.1f}" y1="{top}" y2="{top + size}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" class="tick" text-anchor="end">{100 * tick:.0f}</text>'
                     f'<text x="{x(tick):.1f}" y="{top + size + 16}" class="tick" text-anchor="middle">{100 * tick:.0f}</text>')
    parts.append(f'<line x1="{x(0)}" y1="{y(0)}" x2="{x(1)}" y2="{y(1)}" class="clean"/>'
                 f'<text x="{left + size / 2}" y="{top + size + 34}" class="label" text-anchor="middle">clean Rank-1 (%)</text>'
                 f'<text x="14" y="{top + size / 2}" class="label" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + size / 2})">worst-case Rank-1 (%)</text>')
    families = []
    for row in points:
        family = defense_family(row.get("defense"))
        families.append(family)
        colour = FAMILY_COLOURS.get(family, FAMILY_COLOURS["other"])
        cx, cy = float(row["clean.rank1"]), float(row["standardized.rank1"])
        bars = []
        for key, horizontal in (("clean.rank1", True), ("standardized.rank1", False)):
            lo, hi = row.get(f"{key}.lo"), row.get(f"{key}.hi")
            if not is_missing(lo) and not is_missing(hi):
                bars.append(f'<line x1="{x(lo):.1f}" x2="{x(hi):.1f}" y1="{y(cy):.1f}" y2="{y(cy):.1f}" stroke="{colour}"/>'
                            if horizontal else
                            f'<line x1="{x(cx):.1f}" x2="{x(cx):.1f}" y1="{y(lo):.1f}" y2="{y(hi):.1f}" stroke="{colour}"/>')
        shape = "" if row.get("complete", True) else ' fill-opacity="0.35"'
        label = (f'{row["model"]} ({family}{"" if row.get("complete", True) else ", incomplete"}): clean Rank-1 '
                 f'{100 * cx:.1f}, worst-case Rank-1 {100 * cy:.1f}')
        parts.append(f'<a href="models/{page_name(row["model"])}.html"><g>{"".join(bars)}'
                     f'<circle cx="{x(cx):.1f}" cy="{y(cy):.1f}" r="5" fill="{colour}"{shape}>'
                     f'<title>{escape(label)}</title></circle></g></a>')
    for i, family in enumerate(f for f in FAMILY_COLOURS if f in families):
        ly = top + 8 + 16 * i
        parts.append(f'<circle cx="{left + size + 24}" cy="{ly}" r="5" fill="{FAMILY_COLOURS[family]}"/>'
                     f'<text x="{left + size + 34}" y="{ly + 4}" class="legend">{escape(family)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
