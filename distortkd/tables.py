"""Tables from run metrics: mean ± std pivots over seeds, rendered as Markdown and LaTeX.

A cell is the mean ± sample std (ddof=1) over seeds; a seed that ran twice is averaged first;
cells without a finished run are ``MISSING`` and listed with their failed runs.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MISSING = "—"


@dataclass
class Pivot:
    """Mean, sample std and seed count of a metric per cell (NaN / 0 where no finished run);
    ``failed`` maps a cell ``(row key, column key)`` to paths of its failed or unfinished runs."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: dict = field(default_factory=dict)

    def formatted(self, scale: float = 100.0, digits: int = 1) -> pd.DataFrame:
        """Cells as ``"mean ± std"`` strings (the mean alone for one seed), ``—`` when missing."""
        mean = (self.mean * scale).map(lambda v: f"{v:.{digits}f}")
        std = (self.std * scale).map(lambda v: f"{v:.{digits}f}")
        text = mean.where(self.n.le(1) | self.std.isna(), mean + " ± " + std)
        return text.where(self.mean.notna(), MISSING)


def _sort_key(value: object) -> tuple:
    items = value if isinstance(value, tuple) else (value,)
    return tuple((0, v, "") if isinstance(v, numbers.Real) else (1, 0, str(v)) for v in items)


def _axis(df: pd.DataFrame, keys: list[str], order: Sequence | None) -> pd.Index:
    """Observed key values: those in ``order`` first, in that order, then the rest sorted."""
    seen = set(df[keys].itertuples(index=False, name=None))
    seen = seen if len(keys) > 1 else {v[0] for v in seen}
    first = list(dict.fromkeys(v for v in order or () if v in seen))
    values = first + sorted(seen - set(first), key=_sort_key)
    if len(keys) == 1:
        return pd.Index(values, name=keys[0], dtype=object)
    arrays = list(zip(*values, strict=True)) or [[]] * len(keys)
    return pd.MultiIndex.from_arrays(arrays, names=keys)


def pivot_table(df: pd.DataFrame, rows: str | list[str], cols: str | list[str], metric: str,
                row_order: Sequence | None = None, col_order: Sequence | None = None) -> Pivot:
    """Mean ± std over seeds of ``metric`` per (rows, cols) cell.

    Args:
        df: runs with ``status``, ``seed``, ``path``, the key columns and ``metric``. Runs with a
            missing key are left out; failed runs span the grid but add no value.
        rows: key column(s) of the table rows (several give a MultiIndex).
        cols: key column(s) of the table columns.
        metric: the value column.
        row_order: preferred order of row keys; other observed keys follow, sorted.
        col_order: preferred order of column keys.
    """
    rows, cols = ([k] if isinstance(k, str) else list(k) for k in (rows, cols))
    keys, nrow = rows + cols, len(rows)
    placed = df.dropna(subset=keys)
    ok = placed[placed["status"].eq("ok") & placed[metric].notna()] if metric in df else df[:0]
    seed = ok["seed"].astype(str).where(ok["seed"].notna(), ok["path"])  # no seed: its own run
    per_seed = ok.assign(_seed=seed).groupby([*keys, "_seed"], sort=False)[metric].mean()
    grouped = per_seed.groupby(level=list(range(len(keys))), sort=False)
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(), "n": grouped.size()})
    index, columns = _axis(placed, rows, row_order), _axis(placed, cols, col_order)
    grid = {name: pd.DataFrame(np.nan, index=index, columns=columns) for name in stats}
    if not stats.empty:
        wide = {name: stats[name].unstack(list(range(nrow, len(keys)))) for name in stats}
        grid = {k: v.reindex(index=index, columns=columns).astype(float) for k, v in wide.items()}
    failed = {}
    for key, group in placed[placed["status"].ne("ok")].groupby(keys, sort=False):
        cell = tuple(k[0] if len(k) == 1 else k for k in (key[:nrow], key[nrow:]))
        failed[cell] = group["path"].tolist()
    return Pivot(grid["mean"], grid["std"], grid["n"].fillna(0).astype(int), failed)


@dataclass
class Table:
    """A rendered table: display strings (row labels as index), missing cells and a footnote."""

    name: str
    title: str
    cells: pd.DataFrame
    row_header: str
    missing: list[str] = field(default_factory=list)
    footnote: str = ""
    pivot: Pivot | None = None


def _label(key: object) -> str:
    return " / ".join(map(str, key)) if isinstance(key, tuple) else str(key)


def _footnote(piv: Pivot, what: str) -> str:
    counts = piv.n.to_numpy()[piv.n.to_numpy() > 0]
    if counts.size == 0:
        return f"No finished runs; values: {what}."
    most, few = int(counts.max()), int((counts < counts.max()).sum())
    if most == 1:
        return f"Each cell is a single run (1 seed, no std); values: {what}."
    extra = f"; {few} cell(s) have fewer" if few else ""
    return f"Each cell is mean ± sample std over {most} seeds{extra}; values: {what}."


def make_table(name: str, title: str, piv: Pivot, row_header: str, what: str,
               row_label: Callable = _label, col_label: Callable = _label,
               scale: float = 100.0, digits: int = 1) -> Table:
    """Formats a pivot into a :class:`Table` with display labels and the missing-cell list."""
    cells = piv.formatted(scale, digits)
    missing = []
    for r in cells.index:
        for c in cells.columns:
            if cells.at[r, c] == MISSING:
                paths = piv.failed.get((r, c))
                why = f"failed or unfinished: {', '.join(paths)}" if paths else "no run"
                missing.append(f"{row_label(r)} × {col_label(c)} ({why})")
    cells.index = [row_label(r) for r in cells.index]
    cells.columns = [col_label(c) for c in cells.columns]
    return Table(name, title, cells, row_header, missing, _footnote(piv, what), piv)


def make_tables(name: str, title: str, df: pd.DataFrame, rows, cols, header: str, what: str,
                value: str = "value", split: Sequence[str] = ("model.name", "finetune.mode"),
                orders: tuple = (None, None), **fmt) -> list[Table]:
    """Pivots ``value`` into one table per combination of the ``split`` fields that vary within
    a method (CI's own backbone is no reason to split; two ViTs for our method are)."""
    varying = [f for f in split if df.groupby("method", dropna=False)[f].nunique().gt(1).any()]
    out = []
    df = df.fillna({f: "unspecified" for f in varying})
    for key, part in df.groupby(varying) if varying else [((), df)]:
        words = [str(k) for k in key]
        suffix = f" ({', '.join(words)})" if words else ""
        slug = "_" + re.sub(r"\W+", "-", "_".join(words)) if words else ""
        piv = pivot_table(part, rows, cols, value, *orders)
        if piv.mean.size:
            out.append(make_table(name + slug, title + suffix, piv, header, what, **fmt))
    return out


def to_markdown(table: Table) -> str:
    """A markdown section: heading, pipe table, missing cells, footnote."""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    head = [table.row_header, *map(esc, table.cells.columns)]
    lines = [f"## {table.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, [k, *r])) + " |" for k, r in table.cells.iterrows()]
    if table.missing:
        lines += ["", "Missing cells:", *(f"- {m}" for m in table.missing)]
    return "\n".join([*lines, *(["", f"_{table.footnote}_"] if table.footnote else [])]) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "—": "--", "×": r"$\times$", "Δ": r"$\Delta$", "−": "$-$"}


def to_latex(table: Table) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``); title and footnote as comments."""
    tex = lambda text: "".join(_TEX.get(ch, ch) for ch in str(text))  # noqa: E731
    row = lambda cells: " & ".join(map(tex, cells)) + r" \\"  # noqa: E731
    spec = "l" + "c" * table.cells.shape[1]
    lines = [f"% {table.title}", f"% {table.footnote}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
    lines += [row([table.row_header, *table.cells.columns]), r"\midrule"]
    lines += [row([k, *r]) for k, r in table.cells.iterrows()]
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"
