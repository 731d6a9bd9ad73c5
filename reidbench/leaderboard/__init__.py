"""The leaderboard: a pure function from a folder of result records to a static HTML site.

Same records in, same bytes out: rows, columns and files are sorted, nothing depends on
the time or the machine that renders. The site opens from ``file://`` without a network:
the templates and the small CSS and JavaScript (sorting and filtering) are package data of
this package (``templates/``, ``static/``), the assets copied beside the pages; plots are SVG
drawn here, images are inline PNG. jinja2 autoescaping is on, so a model name or a footnote
holding HTML renders as text, and a model id becomes a file name only after sanitizing.

Layout of ``out_dir``::

    index.html               per dataset × ε: clean against worst-case Rank-1 (one point per
                             model), the summary, then one table per threat model
    models/<model>.html      per model: every cell, robustness vs ε, an example query, provenance
    tables/<table>.csv|json  every table of the site, as numbers (fractions, as in the records)
    models/<model>.csv|json  the model page's table
    cells.csv|json           every cell, flat
    assets/                  site.css, site.js

One concept per module:

    records      result records -> the cells frame (one flat row per cell; ``reported`` blocks)
    table        the table model: columns, rows, how numbers are shown and downloaded
    builders     the summary, threat-model and model-page tables
    plots        the inline SVG plots
    model_page   what a model's page shows
    site         rendering the pages and downloads of each protocol version

Worst cases, stale cells and cross-cell flags are reliability checks of the engine
(:mod:`reidbench.checks`), re-exported here for existing callers.

Every Rank-1 / mAP / mINP and variance carries its 95% interval: shown as ``61.9 ± 4.1``
(half the interval's width; the bounds are in the cell's tooltip), and as ``<column>.lo`` /
``<column>.hi`` in the downloads. Re-ranked numbers under attack are non-adaptive (the attacks
optimise plain distances): they appear only on the model pages, labelled so, never in a
headline or worst-case column.

Each protocol version is rendered apart: the requested one (the current by default) at the
top of ``out_dir``, every other version found in the result folder under
``out_dir/protocol-<version>/``, each page saying so; numbers of two versions never share a table.
"""

from ..checks import CONSISTENCY, consistent_cells, cross_cell_flags, stale_note, worst_case
from ..results import per_query_outcomes
from .builders import expected_attacks, index_sections, model_table, summary_table, threat_table
from .model_page import example_figure, model_page, provenance
from .plots import DEFENSE_FAMILIES, FAMILY_COLOURS, defense_family, robustness_map, robustness_svg
from .records import COLUMNS, INTERVAL_SOURCES, cell_intervals, load_records, results_table
from .site import DEFAULT_SITE, LEADERBOARD_DIR, protocol_summary, render_site, result_versions
from .table import Column, Table, eps_text, page_name, percent, with_interval

__all__ = ["CONSISTENCY", "COLUMNS", "Column", "DEFAULT_SITE", "DEFENSE_FAMILIES", "FAMILY_COLOURS", "INTERVAL_SOURCES",
           "LEADERBOARD_DIR", "Table", "cell_intervals", "consistent_cells", "cross_cell_flags", "defense_family",
           "eps_text", "example_figure", "expected_attacks", "index_sections", "load_records", "model_page",
           "model_table", "page_name", "per_query_outcomes", "percent", "protocol_summary", "provenance",
           "render_site", "result_versions", "results_table", "robustness_map", "robustness_svg", "stale_note",
           "summary_table", "threat_table", "with_interval", "worst_case"]
