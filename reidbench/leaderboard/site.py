"""Rendering the site: the records of each protocol version through the tables, plots and
model pages into HTML (jinja2 templates in ``templates/``, autoescaping on) and CSV / JSON
downloads, written atomically; the small CSS and JavaScript in ``static/`` are copied beside
the pages. Pages and downloads of an earlier render that this one did not write are removed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Optional

from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..cache import atomic_write
from ..errors import ReIDBenchError
from ..protocol import CURRENT_VERSION, known_versions, load_protocol
from ..record import CellRecord
from ..results import read_budget_sweep
from .builders import index_sections
from .model_page import model_page
from .records import cells_frame, load_records
from .table import json_text, page_name, plain_value

# Templates and assets are package data of this package, so an installed reidbench renders
# without a clone.
LEADERBOARD_DIR = Path(__file__).resolve().parent
# The rendered site is the user's, like the results: relative to the working directory.
DEFAULT_SITE = Path("leaderboard") / "site"


def _grid(protocol_version: str) -> Optional[set[str]]:
    """The protocol's attack grid (None for a version this package does not know: every
    attack then counts as standardized)."""
    try:
        return set(load_protocol(protocol_version).attacks())
    except ReIDBenchError:
        return None


def _write(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"), check=False, fsync=False)


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove pages and downloads of an earlier render that this one did not write."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.suffix in (".html", ".csv", ".json") and path not in keep:
                path.unlink()


def result_versions(results_root: Path) -> list[str]:
    """The protocol versions that have a folder in the result store, oldest first."""
    root = Path(results_root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name)]
    return sorted(names, key=lambda v: int(v[1:]))


def protocol_summary(protocol_version: str) -> str:
    """What the numbers of a version mean beyond the shared conventions, for its pages."""
    if protocol_version not in known_versions():
        return (f"This package does not ship protocol {protocol_version}: its attack grid and settings are unknown "
                "here, so every attack counts as standardized.")
    p = load_protocol(protocol_version)
    parts = ["a positive tied with a negative ranks after it" if p.ties == "pessimistic"
             else "a positive tied with a negative is ordered by gallery index"]
    parts.append(f"iterative attacks run from {p.restarts} starts and keep each query's best iterate" if p.restarts > 1
                 else "iterative attacks run once")
    return "Ties: " + parts[0] + "; " + parts[1] + "."


def render_site(results_root: Path, out_dir: Path | None = None, protocol_version: str = CURRENT_VERSION) -> Path:
    """Render the site (see the package docstring) into ``out_dir``; returns the index path.

    ``protocol_version``'s cells are the site; every other version in the result folder is
    rendered apart, into ``out_dir/protocol-<version>/``, and linked with a note."""
    out_dir = Path(out_dir) if out_dir else DEFAULT_SITE
    others = [v for v in result_versions(results_root) if v != protocol_version]
    index = _render_version(results_root, out_dir, protocol_version,
                            {"others": [(v, f"protocol-{v}/index.html") for v in others], "current": None})
    for version in others:
        _render_version(results_root, out_dir / f"protocol-{version}", version,
                        {"others": [], "current": (protocol_version, "../index.html")})
    for path in out_dir.glob("protocol-v*"):
        if path.is_dir() and path.name[len("protocol-"):] not in others:
            shutil.rmtree(path)
    return index


def _render_version(results_root: Path, out_dir: Path, protocol_version: str, apart: dict) -> Path:
    """The site of one protocol version; ``apart`` names the other versions' sites (``others``)
    or, for a version rendered apart, the main one (``current``)."""
    loaded = load_records(results_root, protocol_version)
    cells = cells_frame([row for _, _, row in loaded])
    env = Environment(loader=FileSystemLoader(LEADERBOARD_DIR / "templates"), autoescape=select_autoescape(["html", "j2"]),
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    sweep = read_budget_sweep(results_root, protocol_version)
    sections = index_sections(cells, _grid(protocol_version), sweep, protocol_version)
    files: dict[Path, str] = {}
    for section in sections:
        for table in section["tables"]:
            files[out_dir / "tables" / f"{table.slug}.csv"] = table.csv()
            files[out_dir / "tables" / f"{table.slug}.json"] = table.json()
    records_by_model: dict[str, list[tuple[Path, CellRecord]]] = {}
    for path, record, row in loaded:
        records_by_model.setdefault(row["model"], []).append((path, record))
    page_template = env.get_template("model.html.j2")
    for model in sorted(records_by_model):
        page = model_page(model, cells[cells["model"] == model], records_by_model[model], sweep.get(model))
        name = page_name(model)
        files[out_dir / "models" / f"{name}.html"] = page_template.render(root="../", protocol_version=protocol_version, model=page)
        files[out_dir / "models" / f"{name}.csv"] = page["table"].csv()
        files[out_dir / "models" / f"{name}.json"] = page["table"].json()
    index = out_dir / "index.html"
    files[index] = env.get_template("index.html.j2").render(
        root="", protocol_version=protocol_version, sections=sections, num_cells=len(cells),
        num_models=len(records_by_model), protocol_note=protocol_summary(protocol_version), **apart)
    flat = cells.drop(columns=["path"])
    files[out_dir / "cells.csv"] = flat.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    files[out_dir / "cells.json"] = json_text([{k: plain_value(v) for k, v in row.items()} for row in flat.to_dict("records")])
    for path, text in sorted(files.items()):
        _write(path, text)
    for folder in ("models", "tables"):
        _prune(out_dir / folder, set(files))
    (out_dir / "assets").mkdir(parents=True, exist_ok=True)
    for asset in sorted((LEADERBOARD_DIR / "static").iterdir()):
        shutil.copyfile(asset, out_dir / "assets" / asset.name)
    return index
