"""Tables from run metrics: mean ± std pivots over seeds, rendered as Markdown and LaTeX.

A cell is the mean ± sample std (ddof=1) over seeds; a seed that ran twice is averaged first;
cells without a finished run are ``MISSING`` and listed with their failed runs.

A cell only ever pools runs of one setting (the ``setting`` column: everything but the seed, see
:func:`distortkd.rundir.setting`). :func:`make_tables` gives each setting that shares a cell with
another its own row, labelled with the keys that tell them apart
(``noise_strong [distortion.params.sigma=0.05]``), the same keys for every run of that row, so that
runs of one setting line up across the columns. :func:`pivot_table` itself never pools two
settings: when a cell still holds several (a caller that did not label them), all its runs are left
out and listed. Every run a pivot leaves out is in ``Pivot.left_out`` with the reason: not
finished, no usable value (missing, null, NaN, inf), or a conflict.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

MISSING = "—"


@dataclass
class Pivot:
    """Mean, sample std and seed count of a metric per cell (NaN / 0 where no finished run);
    ``failed`` maps a cell ``(row key, column key)`` to paths of its failed or unfinished runs;
    ``left_out`` lists ``(path, reason)`` of every placed run that gave no value; ``unused`` maps
    a cell to the finished runs among them."""

    mean: pd.DataFrame
    std: pd.DataFrame
    n: pd.DataFrame
    failed: dict = field(default_factory=dict)
    left_out: list = field(default_factory=list)
    unused: dict = field(default_factory=dict)

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


def _settings(df: pd.DataFrame) -> pd.Series:
    """Each run's setting (its path when unknown: such a run pools with nothing)."""
    if "setting" not in df:
        return pd.Series("", index=df.index, dtype=object)
    return df["setting"].where(df["setting"].notna(), df["path"])


def differing(settings: Iterable[str]) -> dict[str, list]:
    """``{key: values}`` for the keys whose values differ among JSON settings (absent: "unset")."""
    flats = [json.loads(s) if s.startswith("{") else {"path": s} for s in settings]
    keys = sorted(set().union(*flats))
    values = {k: [f.get(k, "unset") for f in flats] for k in keys}
    return {k: v for k, v in values.items() if len({json.dumps(x, default=str) for x in v}) > 1}


def _conflicts(ok: pd.DataFrame, keys: list[str], nrow: int) -> tuple[pd.DataFrame, list]:
    """``ok`` without the cells that hold more than one setting, and those runs as left out."""
    sets = _settings(ok)
    counts = sets.groupby([ok[k] for k in keys], sort=False).transform("nunique")
    left = []
    for key, group in ok[counts.gt(1)].groupby(keys, sort=False):
        diff = differing(sets[group.index].unique())
        k, vals = next(iter(diff.items()))
        shown = " vs ".join(dict.fromkeys(map(str, vals)))
        cell = f"{_label(key[:nrow])} × {_label(key[nrow:])}"
        left += [(p, f"conflicts with {len(group) - 1} other runs in cell {cell}: differs in "
                     f"key {k} ({shown})" + (f" and {len(diff) - 1} more" if len(diff) > 1 else ""))
                 for p in group["path"]]
    return ok[counts.le(1)], left


def _unusable(placed: pd.DataFrame, metric: str) -> list:
    """``(path, reason)`` of finished runs that give no finite value."""
    vals = pd.to_numeric(placed[metric], errors="coerce") if metric in placed else None
    bad = placed if vals is None else placed[~np.isfinite(vals.astype(float))]
    bad = bad[bad["status"].eq("ok")]
    why = bad["_why"] if "_why" in bad else pd.Series(None, index=bad.index, dtype=object)
    return [(p, w if isinstance(w, str) else f"no finite `{metric}`")
            for p, w in zip(bad["path"], why, strict=True)]


def pivot_table(df: pd.DataFrame, rows: str | list[str], cols: str | list[str], metric: str,
                row_order: Sequence | None = None, col_order: Sequence | None = None) -> Pivot:
    """Mean ± std over seeds of ``metric`` per (rows, cols) cell.

    Args:
        df: runs with ``status``, ``seed``, ``path``, the key columns and ``metric``; optional
            ``setting`` (runs pool only within one) and ``_why`` (why a run has no value). Runs
            with a missing key are left out; failed runs span the grid but add no value.
        rows: key column(s) of the table rows (several give a MultiIndex).
        cols: key column(s) of the table columns.
        metric: the value column.
        row_order: preferred order of row keys; other observed keys follow, sorted.
        col_order: preferred order of column keys.
    """
    rows, cols = ([k] if isinstance(k, str) else list(k) for k in (rows, cols))
    keys, nrow = rows + cols, len(rows)
    placed = df.dropna(subset=keys)
    left = _unusable(placed, metric)
    finite = np.isfinite(pd.to_numeric(placed[metric], errors="coerce").astype(float)) \
        if metric in placed else pd.Series(False, index=placed.index)
    ok, conflicts = _conflicts(placed[placed["status"].eq("ok") & finite], keys, nrow)
    seed = ok["seed"].astype(str).where(ok["seed"].notna(), ok["path"])  # no seed: its own run
    per_seed = ok.assign(_seed=seed).groupby([*keys, "_seed"], sort=False)[metric].mean()
    grouped = per_seed.groupby(level=list(range(len(keys))), sort=False)
    stats = pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(), "n": grouped.size()})
    index, columns = _axis(placed, rows, row_order), _axis(placed, cols, col_order)
    grid = {name: pd.DataFrame(np.nan, index=index, columns=columns) for name in stats}
    if not stats.empty:
        wide = {name: stats[name].unstack(list(range(nrow, len(keys)))) for name in stats}
        grid = {k: v.reindex(index=index, columns=columns).astype(float) for k, v in wide.items()}
    failed, unused = _by_cell(placed[placed["status"].ne("ok")], keys, nrow), {}
    if left or conflicts:
        paths = {p for p, _ in left + conflicts}
        unused = _by_cell(placed[placed["status"].eq("ok") & placed["path"].isin(paths)], keys, nrow)
    return Pivot(grid["mean"], grid["std"], grid["n"].fillna(0).astype(int), failed,
                 left + conflicts, unused)


def _by_cell(df: pd.DataFrame, keys: list[str], nrow: int) -> dict:
    """``{(row key, column key): [paths]}`` of the runs in ``df``."""
    out = {}
    for key, group in df.groupby(keys, sort=False):
        cell = tuple(k[0] if len(k) == 1 else k for k in (key[:nrow], key[nrow:]))
        out[cell] = group["path"].tolist()
    return out


@dataclass
class Table:
    """A rendered table: display strings (row labels as index), missing cells, a footnote, and
    ``left_out``: ``(path, reason)`` of every run that gave it no value (the report lists them)."""

    name: str
    title: str
    cells: pd.DataFrame
    row_header: str
    missing: list[str] = field(default_factory=list)
    footnote: str = ""
    pivot: Pivot | None = None
    left_out: list = field(default_factory=list)


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
                paths, unused = piv.failed.get((r, c)), piv.unused.get((r, c))
                why = [f"failed or unfinished: {', '.join(paths)}"] if paths else []
                why += [f"left out (see Left out): {', '.join(unused)}"] if unused else []
                why = "; ".join(why) or "no run"
                missing.append(f"{row_label(r)} × {col_label(c)} ({why})")
    cells.index = [row_label(r) for r in cells.index]
    cells.columns = [col_label(c) for c in cells.columns]
    return Table(name, title, cells, row_header, missing, _footnote(piv, what), piv, list(piv.left_out))


def _show(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _tag(flat: dict, names: list[str], setting: str, most: int = 3) -> str:
    """``key=value, …`` for ``names``; past ``most`` keys, a count and a digest of the whole
    setting keep different settings apart without a label as long as the config."""
    shown = ", ".join(f"{k}={_show(flat.get(k, 'unset'))}" for k in names[:most])
    if len(names) <= most:
        return shown
    return f"{shown}, +{len(names) - most} keys #{hashlib.sha1(setting.encode()).hexdigest()[:6]}"


def setting_labels(df: pd.DataFrame, cell: Sequence[str], by: Sequence[str]) -> pd.Series:
    """Per run, the settings that tell it apart from other settings in the same ``cell``.

    The keys are collected per value of ``by`` (e.g. the row keys) over all its cells, and every
    run with that ``by`` value is labelled with its own values of them, so that runs of one setting
    get one label in every column. Runs of equal labels in one cell then have equal settings.

    Returns:
        ``"key=value, …"`` per row of ``df`` (``""`` where no cell of its ``by`` holds two settings).
    """
    labels = pd.Series("", index=df.index, dtype=object)
    placed = df.dropna(subset=list(cell))
    if "setting" not in df or placed.empty:
        return labels
    sets = _settings(placed)
    keys: dict[tuple, set] = {}
    for _, group in sets.groupby([placed[k] for k in cell], sort=False):
        if group.nunique() > 1:
            owner = tuple(placed.loc[group.index[0], list(by)])
            keys.setdefault(owner, set()).update(differing(group.unique()))
    for owner, names in keys.items():
        mine = placed[np.logical_and.reduce([placed[k].eq(v) for k, v in zip(by, owner, strict=True)])]
        for index, text in sets[mine.index].items():
            flat = json.loads(text) if text.startswith("{") else {"path": text}
            if any(k in flat for k in names):  # all unset: one setting of its cell, needs no tag
                labels[index] = _tag(flat, sorted(names), text)
    return labels


def _with_setting_rows(df: pd.DataFrame, rows: list[str], cols: list[str], order, fmt: dict):
    """Adds the ``_setting`` label (see :func:`setting_labels`) as the last row key when needed.

    Returns:
        ``(df, rows, order, fmt)``, adapted: row order and row labels know the extra key.
    """
    labels = setting_labels(df, [*rows, *cols], rows)
    if labels.eq("").all():
        return df, rows, order, fmt
    base, single = fmt.get("row_label", _label), len(rows) == 1
    tail = lambda lab: f" [{lab}]" if lab else ""  # noqa: E731
    fmt = {**fmt, "row_label": lambda k: base(k[0] if single else k[:-1]) + tail(k[-1])}
    tags = ["", *sorted(set(labels) - {""})]
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    order = [(*as_tuple(o), t) for o in order for t in tags] if order is not None else None
    return df.assign(_setting=labels), [*rows, "_setting"], order, fmt


SETTINGS_NOTE = ("Rows tagged [key=value] hold runs whose settings differ from others of the "
                 "same cell: they are never pooled.")


def make_tables(name: str, title: str, df: pd.DataFrame, rows, cols, header: str, what: str,
                value: str = "value", split: Sequence[str] = ("model.name", "finetune.mode"),
                orders: tuple = (None, None), per: Sequence[str] = (), **fmt) -> list[Table]:
    """Pivots ``value`` into one table per combination of the ``split`` fields that vary within
    a method (CI's own backbone is no reason to split; two ViTs for our method are) and of the
    ``per`` fields that vary at all (one table per dataset). Settings sharing a cell get their
    own rows (:func:`setting_labels`)."""
    varying = [f for f in split if df.groupby("method", dropna=False)[f].nunique().gt(1).any()]
    varying += [f for f in per if f not in varying and df[f].nunique() > 1]
    out = []
    df = df.fillna({f: "unspecified" for f in varying})
    rows, cols = ([k] if isinstance(k, str) else list(k) for k in (rows, cols))
    for key, part in df.groupby(varying) if varying else [((), df)]:
        words = [str(k) for k in key]
        suffix = f" ({', '.join(words)})" if words else ""
        slug = "_" + re.sub(r"\W+", "-", "_".join(words)) if words else ""
        part, prow, order, pfmt = _with_setting_rows(part, rows, cols, orders[0], fmt)
        piv = pivot_table(part, prow, cols, value, order, orders[1])
        if piv.mean.size:
            table = make_table(name + slug, title + suffix, piv, header, what, **pfmt)
            table.footnote += f" {SETTINGS_NOTE}" if "_setting" in prow else ""
            out.append(table)
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
