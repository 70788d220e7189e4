"""The LSPT paper's published top-1 accuracies (Mo et al. 2024; ViT-B/16), copied as data so a sweep's report
can show them beside its own numbers.

Table 1 (FGVC) and table 2 (VTAB-1k group means) per backbone (MAE, MoCo v3) and method; table 3 (ablations
of CSPC / LPC, MoCo v3) per LSPT variant. VTAB's "Average" is the mean over the 19 tasks (the table's numbers
are the task-weighted mean of its group means: 7 / 4 / 8), FGVC's the mean over the 5 datasets.
"""
from __future__ import annotations

__all__ = ["PAPER", "TABLE3", "paper_value", "BACKBONES"]

BACKBONES = {"mae": "MAE", "mocov3": "MoCo v3"}

_FGVC = ("cub", "flowers", "cars", "dogs", "nabirds", "FGVC mean")
_VTAB = ("Natural", "Specialized", "Structured", "VTAB mean")


# (backbone, method) -> values in the order of the columns above.
_TABLE1 = {
    ("mae", "vpt-shallow"): (42.15, 69.15, 43.38, 77.07, 57.43, 57.84),
    ("mae", "vpt-deep"): (68.33, 80.05, 67.67, 78.83, 65.22, 72.02),
    ("mae", "gapt"): (70.56, 78.55, 71.70, 78.90, 67.26, 73.39),
    ("mae", "lspt"): (73.86, 82.32, 74.75, 82.05, 71.73, 76.94),
    ("mocov3", "vpt-shallow"): (79.05, 90.47, 71.91, 81.97, 72.92, 79.26),
    ("mocov3", "vpt-deep"): (82.67, 94.41, 79.18, 83.33, 75.99, 83.12),
    ("mocov3", "gapt"): (82.86, 93.71, 79.02, 83.37, 76.02, 83.00),
    ("mocov3", "lspt"): (84.29, 95.06, 80.12, 84.25, 77.16, 84.18),
}
_TABLE2 = {
    ("mae", "linear"): (18.87, 53.72, 23.70, 28.24),
    ("mae", "adapter"): (54.90, 75.19, 38.98, 52.47),
    ("mae", "vpt-shallow"): (39.96, 69.65, 27.50, 40.96),
    ("mae", "vpt-deep"): (36.02, 60.61, 26.57, 37.22),
    ("mae", "gapt"): (47.61, 76.86, 36.80, 49.22),
    ("mae", "lspt"): (52.36, 80.75, 41.72, 53.86),
    ("mocov3", "linear"): (67.46, 81.08, 30.33, 54.69),
    ("mocov3", "adapter"): (74.19, 82.66, 47.69, 64.82),
    ("mocov3", "vpt-shallow"): (67.34, 82.26, 37.55, 57.94),
    ("mocov3", "vpt-deep"): (70.27, 83.04, 42.38, 61.22),
    ("mocov3", "gapt"): (74.84, 83.38, 49.10, 65.80),
    ("mocov3", "lspt"): (77.19, 85.69, 52.82, 68.72),
}


def _collect() -> dict:
    out: dict = {b: {} for b in BACKBONES}
    for table, columns, source in ((_TABLE1, _FGVC, "LSPT paper, table 1"), (_TABLE2, _VTAB, "LSPT paper, table 2")):
        for (backbone, method), values in table.items():
            out[backbone].setdefault(method, {}).update({c: (v, source) for c, v in zip(columns, values)})
    return out


# PAPER[backbone][method][column] -> (top-1 %, source); column: an FGVC task, a VTAB group or a benchmark mean.
PAPER = _collect()

# Table 3 (MoCo v3): rows by (CSPC on, LPC on); LSPT's options cspc="none" / lpc="none" switch them off.
# The table prints its (off, off) row with VPT-deep's MAE FGVC numbers and VPT-shallow's MoCo v3 VTAB numbers
# from tables 1-2; they are copied as printed.
_T3 = "LSPT paper, table 3"
TABLE3 = {
    (False, False): (68.33, 80.05, 67.67, 78.83, 65.22, 67.34, 82.26, 37.55),
    (True, False): (76.28, 85.23, 72.16, 80.51, 70.63, 72.36, 83.56, 45.15),
    (False, True): (78.12, 89.17, 75.38, 82.75, 73.58, 75.18, 84.28, 48.39),
    (True, True): (84.29, 95.06, 80.12, 84.25, 77.16, 77.19, 85.69, 52.82),
}
_T3_COLUMNS = ("cub", "flowers", "cars", "dogs", "nabirds", "Natural", "Specialized", "Structured")


def paper_value(backbone: str | None, method: str, options: dict, column: str):
    """(top-1, source) the paper reports for this backbone, method (with its LSPT options) and column, or None.

    A method with options other than LSPT's cspc / lpc switches has no published number; an LSPT variant with
    one of them off is looked up in table 3 (MoCo v3 only)."""
    if backbone not in PAPER:
        return None
    if not options:
        return PAPER[backbone].get(method, {}).get(column)
    if method != "lspt" or backbone != "mocov3" or set(options) - {"cspc", "lpc"}:
        return None
    if any(options.get(k) not in (None, default, "none") for k, default in (("cspc", "mean"), ("lpc", "lstm"))):
        return None
    key = (options.get("cspc", "mean") != "none", options.get("lpc", "lstm") != "none")
    if column not in _T3_COLUMNS:
        return None
    return TABLE3[key][_T3_COLUMNS.index(column)], _T3
