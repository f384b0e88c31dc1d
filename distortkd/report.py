"""``distortkd-report``: the paper's tables and figures rebuilt from run folders alone (no W&B).

Run folders are read by :mod:`distortkd.runs`: a failed run is listed, and its cell missing.
A cell is the mean ± sample std (ddof=1) over seeds; a seed that ran twice is averaged first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from distortkd import figures
from distortkd.errors import UserError, unknown
from distortkd.runs import (  # noqa: F401  (re-exported: report.load_runs etc. are public)
    ROW_METRICS,
    find_run_dirs,
    load_rows,
    load_runs,
    scan,
)
from distortkd.tables import (  # noqa: F401  (re-exported: report.pivot_table etc. are public)
    MISSING,
    Table,
    make_table,
    make_tables,
    pivot_table,
    to_latex,
    to_markdown,
)

METHODS = {"ci": "CI", "supervised": "Supervised", "ours": "Ours"}
PRESET_ORDER = ("mask_weak", "mask_strong", "noise_weak", "noise_strong", "blur_weak",
                "blur_strong")
STRONG = ("mask_strong", "noise_strong", "blur_strong")
STUDENT_ORDER = ("mask_strong", "noise_strong", "blur_strong", "blur_demo", "mixed", "mixed_demo")
FAMILIES = {"mask": ("RM", "Random Mask"), "gaussian_noise": ("GN", "Gaussian Noise"),
            "gaussian_blur": ("GB", "Gaussian Blur"), "mixed": ("MX", "Mixed"),
            "identity": ("ID", "Clean")}
TRANSFER = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10",
            "resisc45": "RESISC45", "camelyon17": "Camelyon17"}
LOSSES = {"global": "Global", "global_local": "Gl. Local", "global_attn": "Gl. Attention",
          "multilevel": "Gl. Local Attention"}
REPRESENTATION = {"val/cos_clean_baseline": "Before: teacher(distorted) vs teacher(clean)",
                  "val/cos_clean": "After: student(distorted) vs teacher(clean)"}

# ---------------------------------------------------------------------------------- selections


def with_value(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, str]:
    """Adds column ``value``: ``metric``, or ``val/acc1`` for runs lacking ``test/acc1``.

    Returns:
        The frame, and a footnote text naming the metric(s) used and how many runs each filled.
    """
    value, used = pd.Series(np.nan, index=df.index), {}
    for name in [metric, *(["val/acc1"] if metric == "test/acc1" else [])]:
        if name in df:
            fill = value.isna() & df[name].notna()
            used[name] = int((fill & df["status"].eq("ok")).sum())
            value = value.where(~fill, df[name])
    text = ", ".join(f"`{m}` ({k} runs)" for m, k in used.items() if k) or f"`{metric}`"
    return df.assign(value=value.astype(float)), text + (" in %" if "acc" in metric else " ×100")


def _ranked(df: pd.DataFrame, column: str, order: Iterable) -> pd.DataFrame:
    """Stable sort by the position of ``column``'s value in ``order`` (other values last)."""
    rank = {v: i for i, v in enumerate(order)}
    return df.iloc[np.argsort(df[column].map(rank).fillna(len(rank)).to_numpy(), kind="stable")]


def with_variant(df: pd.DataFrame, exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Adds column ``variant``: the method's name plus the fields that vary within the method
    (e.g. ``Ours (mixed)``), so that different students never share a line or column. Rows come
    back sorted by method (CI, Supervised, Ours, others), so variants appear in that order."""
    fields = ("distortion.name", "loss.name", "model.name", "data.name", "finetune.mode")
    fields = [f for f in fields if f not in exclude]
    df = _ranked(df, "method", METHODS)
    base = df["method"].map(lambda m: METHODS.get(m, str(m)))
    if df.empty:
        return df.assign(variant=base)
    varies = {f: df.groupby("method", dropna=False)[f].transform("nunique") > 1 for f in fields}
    parts = pd.concat([df[f].astype(str).where(v, "") for f, v in varies.items()], axis=1)
    extra = parts.apply(lambda r: ", ".join(x for x in r if x), axis=1)
    return df.assign(variant=base.where(extra.eq(""), base + " (" + extra + ")"))


def _scope(df: pd.DataFrame, opts) -> pd.DataFrame:
    """Runs of ``--experiment`` and ``--data`` when given."""
    df = df[df["experiment"].eq(opts.experiment)] if opts.experiment else df
    return df[df["data.name"].eq(opts.data)] if opts.data else df


def _finetune(runs: pd.DataFrame, opts, default_data: Sequence[str] | None) -> pd.DataFrame:
    """Fine-tuning runs of ``--experiment``, else on ``default_data`` (or ``--data``) with all
    labels; ``default_data=None`` keeps every dataset and label fraction."""
    sel = _scope(runs[runs["task"].eq("finetune")], opts)
    if default_data is not None and not opts.experiment:
        sel = sel[sel["data.label_fraction"].eq(1.0)]
        sel = sel if opts.data else sel[sel["data.name"].isin(default_data)]
    return sel


def _main_loss(df: pd.DataFrame) -> pd.DataFrame:
    """Our method with the full multi-level loss only: ablation students stay out of its column."""
    return df[df["method"].ne("ours") | df["loss.name"].eq("multilevel")]


def _method(m: str) -> str:
    return METHODS.get(m, m)


def _family(f: str, short: bool = False) -> str:
    return FAMILIES.get(f, (f, f))[0 if short else 1]


def table1(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 1, in-domain: distortion preset × method, ImageNet-100 with all labels."""
    sel, what = with_value(_main_loss(_finetune(runs, opts, ["imagenet100"])), opts.metric)
    return make_tables("table1", "Table 1: in-domain accuracy (%)", sel, "distortion.name",
                       "method", "Distortion", what, orders=(PRESET_ORDER, METHODS),
                       col_label=_method)


def table2(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 2, transfer: (method, family of the strong preset) × downstream dataset."""
    sel = _main_loss(_finetune(runs, opts, list(TRANSFER)))
    sel, what = with_value(sel[sel["distortion.name"].isin(STRONG)], opts.metric)
    names = {**METHODS, "supervised": "Baseline"}
    label = lambda k: f"{names.get(k[1], k[1])} ({_family(k[0], True)})"  # noqa: E731
    order = ([(f, m) for f in FAMILIES for m in METHODS], TRANSFER)
    return make_tables("table2", "Table 2: transfer accuracy (%)", sel,
                       ["distortion.family", "method"], "data.name", "Method", what, orders=order,
                       row_label=label,
                       col_label=lambda d: TRANSFER.get(d, d))


def table3(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 3, loss ablation of our method: loss × family of the strong preset."""
    sel = _finetune(runs, opts, ["imagenet100"])
    sel = sel[sel["method"].eq("ours") & sel["distortion.name"].isin(STRONG)]
    sel, what = with_value(sel, opts.metric)
    return make_tables("table3", "Table 3: loss ablation, accuracy (%)", sel, "loss.name",
                       "distortion.family", "Loss", what, orders=(LOSSES, FAMILIES),
                       row_label=lambda k: LOSSES.get(k, k), col_label=_family)


def mce(rows: pd.DataFrame, metric: str = "acc1") -> pd.DataFrame:
    """Corruption errors ×100 relative to the supervised baseline, as in ImageNet-C.

    ``CE_c = Σ_s err(c, s) / Σ_s err_sup(c, s)`` with ``err = 1 − accuracy`` averaged over seeds
    (the reference pools every supervised run), over the severities both have;
    ``mCE = mean_c CE_c`` over the corruptions a model has.

    Returns:
        Index: corruption names, then ``mCE``; columns: ``variant`` labels (added if absent).
    """
    rows = rows if "variant" in rows else with_variant(rows)
    rows, keys = rows.dropna(subset=["distortion", "severity", metric]), ["distortion", "severity"]
    ref = 1 - rows[rows["method"].eq("supervised")].groupby(keys)[metric].mean()
    if ref.empty:
        return pd.DataFrame()
    ce = {}
    for variant, part in rows.groupby("variant", sort=False):
        err = 1 - part.groupby(keys)[metric].mean()
        common = err.index.intersection(ref.index)
        ce[variant] = err[common].groupby(level=0).sum() / ref[common].groupby(level=0).sum() * 100
    table = pd.DataFrame(ce)
    table.loc["mCE"] = table.mean()
    return table


def heldout(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Held-out corruptions: accuracy per corruption × severity per model, then CE and mCE."""
    sel = with_variant(_scope(rows[rows["suite"].eq("heldout")], opts))
    tables = make_tables("heldout", "Held-out corruptions: accuracy (%)", sel,
                         ["distortion", "severity"], "variant", "Corruption / severity",
                         "`acc1` of evaluate rows in %", value="acc1", split=(),
                         orders=(None, list(dict.fromkeys(sel["variant"]))),
                         row_label=lambda k: f"{k[0]} / {k[1]:g}")
    ce = mce(sel) if tables else pd.DataFrame()
    if not ce.empty:
        cells = ce.map(lambda v: MISSING if pd.isna(v) else f"{v:.1f}")
        note = "CE_c = Σ_s err / Σ_s err(Supervised) × 100, errors averaged over seeds; mCE = mean."
        title = "Held-out corruptions: corruption error (mCE)"
        tables.append(Table("mce", title, cells, "Corruption", footnote=note))
    return tables


def diagnostics(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Representation diagnostics per model × distortion, averaged over severities per seed; the
    rows' ``teacher_*`` values (teacher on distorted vs on clean) give a "Teacher" reference."""
    sel = with_variant(_scope(rows, opts))
    present = [m for m in ROW_METRICS if m in sel and sel[m].notna().any()]
    pre = {f"teacher_{m}": m for m in present if f"teacher_{m}" in sel}
    if pre:
        teacher = sel.drop(columns=present).rename(columns=pre).assign(variant="Teacher (distorted)")
        sel = pd.concat([teacher, sel], ignore_index=True)
    long = sel.melt(id_vars=["variant", "distortion", "seed", "path", "status"], value_vars=present,
                    var_name="metric", value_name="v").dropna(subset=["v"])
    order = list(long[["variant", "distortion"]].itertuples(index=False, name=None))
    return make_tables("diagnostics", "Diagnostics (evaluate rows)", long,
                       ["variant", "distortion"], "metric", "Model / distortion",
                       "per-seed mean over severities", value="v", split=(),
                       orders=(order, ROW_METRICS), scale=1.0, digits=3)


def demo(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Demo: (distortion, label fraction) × method, and Δ = Ours − Supervised (of the means)."""
    sel, what = with_value(_demo_finetunes(runs, opts), opts.metric)
    tables = make_tables("demo", "Demo: accuracy by distortion and label fraction (%)", sel,
                         ["distortion.name", "data.label_fraction"], "method",
                         "Distortion / labels", what, orders=(None, ["supervised", "ours"]),
                         col_label=_method,
                         row_label=lambda k: f"{k[0]} / {k[1] * 100:g}%")
    for t in tables:
        if {"supervised", "ours"} <= set(t.pivot.mean.columns):
            delta = (t.pivot.mean["ours"] - t.pivot.mean["supervised"]).to_numpy() * 100
            t.cells["Δ Ours − Sup."] = [MISSING if np.isnan(d) else f"{d:+.1f}" for d in delta]
    return tables


CURVE_STEPS = (20, 40, 100, 200, 300, 400, 600, 800, 1000)  # table columns (40: the old budget)


def _demo_finetunes(runs: pd.DataFrame, opts) -> pd.DataFrame:
    """The demo table's runs: full fine-tunes of Supervised and Ours on a distortion."""
    sel = _main_loss(_finetune(runs, opts, None))
    sel = sel[sel["finetune.mode"].fillna("full").eq("full") & sel["distortion.family"].ne("identity")]
    return sel[sel["method"].isin(["supervised", "ours"])]


def _curve(run: str) -> pd.DataFrame:
    """``steps`` (optimizer steps done) and ``val`` (val/acc1) of one run's ``csv/metrics.csv``."""
    csv = Path(run) / "csv" / "metrics.csv"
    if not csv.is_file():
        return pd.DataFrame(columns=["steps", "val"])
    log = pd.read_csv(csv)
    log = log[log["val/acc1"].notna()] if "val/acc1" in log else log.iloc[:0]
    # Lightning logs a validation after optimizer step n at step n - 1.
    return pd.DataFrame({"steps": log["step"].astype(int) + 1, "val": log["val/acc1"].astype(float)})


def finetune_curves(runs: pd.DataFrame, opts) -> pd.DataFrame:
    """Validation accuracy vs fine-tune steps of the demo's fine-tunes, one row per logged check:
    the run's fields plus ``steps``, ``val``, ``selected`` (the best check, which ``best.ckpt``
    holds: the first maximum) and ``value`` (the run's test accuracy, of that checkpoint)."""
    sel, _ = with_value(_demo_finetunes(runs[runs["status"].eq("ok")], opts), opts.metric)
    records = []
    for run in sel.to_dict("records"):
        curve = _curve(run["path"])
        best = curve["val"].to_numpy().argmax() if len(curve) else -1
        records += [{**run, "steps": int(c.steps), "val": float(c.val), "selected": i == best}
                    for i, c in enumerate(curve.itertuples(index=False))]
    return pd.DataFrame(records)


def _mean_std(values: pd.Series, digits: int = 1, scale: float = 100.0) -> str:
    v = values.dropna().to_numpy(dtype=float) * scale
    if not len(v):
        return MISSING
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def steps(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Demo: val accuracy after N fine-tune steps, the step each run stopped at and the one its
    selected (best-val) checkpoint is from, and that checkpoint's test accuracy; mean ± std over
    seeds. A run that stopped early has no value at later steps (—)."""
    curves = finetune_curves(runs, opts)
    if curves.empty:
        return []
    last = curves["steps"].max()
    shown = [s for s in CURVE_STEPS if s <= last]
    cells = {}
    keys = ["distortion.name", "data.label_fraction", "method"]
    curves = curves.assign(rank=curves["method"].map({m: i for i, m in enumerate(METHODS)}))
    for (name, frac, method), part in curves.sort_values([*keys[:2], "rank"], kind="stable").groupby(
            keys, sort=False):
        at = {f"val @ {s}": _mean_std(part.loc[part["steps"].eq(s), "val"]) for s in shown}
        per_run = part.groupby("path")
        at["stopped at"] = _mean_std(per_run["steps"].max(), 0, 1.0)
        at["selected step"] = _mean_std(part.loc[part["selected"], "steps"], 0, 1.0)
        at["val (selected)"] = _mean_std(part.loc[part["selected"], "val"])
        at["test (selected)"] = _mean_std(per_run["value"].first())
        cells[f"{name} / {frac * 100:g}% / {_method(method)}"] = at
    table = pd.DataFrame.from_dict(cells, orient="index")
    note = ("val/acc1 (%) on the val split carved from train (data.val_fraction); test (selected): "
            "test accuracy of the best-val checkpoint; mean ± std over seeds; steps of 128 images.")
    return [Table("steps", "Accuracy vs fine-tune steps", table, "Distortion / labels / method",
                  footnote=note)]


def representation(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Cosine to the clean teacher before (teacher on distorted) and after (student) distilling."""
    sel = _scope(runs[runs["task"].eq("distill") & runs["method"].eq("ours")], opts)
    ids = ["method", "distortion.name", "model.name", "loss.name", "seed", "path", "status"]
    long = sel.melt(id_vars=ids, value_vars=[m for m in REPRESENTATION if m in sel],
                    var_name="metric", value_name="v")
    long = long[long["v"].notna() | long["status"].ne("ok")]  # failed runs stay, as missing cells
    return make_tables("representation", "Representation: CLS cosine to the clean teacher", long,
                       "distortion.name", "metric", "Distortion", "validation-set cosine",
                       value="v", split=("model.name", "loss.name"),
                       orders=(PRESET_ORDER, REPRESENTATION),
                       col_label=lambda m: REPRESENTATION.get(m, m), scale=1.0, digits=3)


def mixed(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Each family evaluated on (evaluate rows, any suite): our student distilled on that family
    ("specialist") vs our student distilled on ``mixed``; accuracy averaged over severities."""
    sel = _scope(rows[rows["method"].eq("ours")], opts)
    families = set(sel["distortion.family"].dropna()) - {"mixed", "identity"}
    sel = sel[sel["distortion"].isin(families)]
    student = np.where(sel["distortion.family"].eq("mixed"), "mixed",
                       np.where(sel["distortion.family"].eq(sel["distortion"]), "specialist", None))
    sel = sel.assign(student=student).dropna(subset=["student"])
    if not sel["student"].eq("mixed").any():
        return []
    names = {"specialist": "Distilled on that family", "mixed": "Distilled on mixed"}
    return make_tables("mixed", "Mixed vs per-distortion students: accuracy (%)", sel, "distortion",
                       "student", "Evaluated on", "`acc1` in %, mean over severities", "acc1",
                       orders=(FAMILIES, names), row_label=_family, col_label=names.get)


def robustness(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Fig. 2 as a table: accuracy per (family, severity) × method, from evaluate rows."""
    sel = _scope(rows[rows["suite"].eq("paper")], opts)
    if sel.empty:
        return []
    return make_tables("robustness", "Accuracy (%) vs severity (training severity first)", sel,
                       ["distortion", "severity"], "method", "Distortion / severity",
                       "`acc1` of evaluate rows in %", "acc1",
                       orders=(None, ["ci", "supervised", "ours"]),
                       col_label=_method, row_label=lambda k: f"{k[0]} / {k[1]:g}")


def knn(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """k-NN accuracy of every distilled student (columns: what it was distilled on) on every
    distortion (rows): the specialists on the diagonal, the mixed student in its own column."""
    sel = _scope(runs[runs["task"].eq("finetune") & runs["finetune.mode"].eq("knn")], opts)
    if sel.empty:
        return []
    sel, what = with_value(sel, opts.metric)
    return make_tables("knn",
                       "k-NN accuracy (%): student distilled on (columns) × evaluated on (rows)",
                       sel, "distortion.name", "pretrain.distortion", "Evaluated on", what,
                       orders=(PRESET_ORDER, STUDENT_ORDER))


# ------------------------------------------------------------------------------ figures and CLI

TABLES = {"table1": table1, "table2": table2, "table3": table3, "heldout": heldout,
          "diagnostics": diagnostics, "demo": demo, "representation": representation,
          "mixed": mixed, "knn": knn, "robustness": robustness, "steps": steps}
FIGURES = ("severity", "labels", "attention", "steps_figure")
LAYOUTS = {"paper": ("table1", "table2", "table3", "heldout", "diagnostics", *FIGURES[:3]),
           "demo": ("demo", "steps", "representation", "robustness", "diagnostics", "knn", "mixed",
                    "heldout", *FIGURES)}
ALIASES = {"fig2": "severity", "fig3": "labels", "fig4": "attention"}


def make_figure(name: str, runs: pd.DataFrame, rows: pd.DataFrame, opts, out: Path) -> list[Path]:
    """Draws ``severity.png`` (Fig. 2), ``labels.png`` (Fig. 3), ``attention*.png`` (Fig. 4) or
    the demo's ``steps.png`` (accuracy vs fine-tune steps)."""
    if name == "severity":
        sel = _ranked(with_variant(_scope(rows[rows["suite"].eq("paper")], opts)), "distortion",
                      FAMILIES)
        return [p for p in [figures.severity_figure(sel, out / "severity.png", title=_family)] if p]
    if name == "steps_figure":
        curves = finetune_curves(runs, opts)
        if curves.empty:
            return []
        curves = with_variant(curves.assign(**{"finetune.mode": "full"}), ("distortion.name",))
        return [p for p in [figures.steps_figure(curves, out / "steps.png")] if p]
    sel = _scope(runs[runs["status"].eq("ok")], opts)
    if name == "labels":
        sel = _main_loss(with_value(sel[sel["task"].eq("finetune")], opts.metric)[0])
        sel = _ranked(with_variant(sel, ("distortion.name",)), "distortion.name", PRESET_ORDER)
        return [p for p in [figures.labels_figure(sel, out / "labels.png")] if p]
    npz = [Path(p) / "attention.npz" for p in sel["path"] if (Path(p) / "attention.npz").is_file()]
    return figures.attention_figures(npz[0], out) if npz else []


def _document(opts, runs: pd.DataFrame, sections: list, made: list, skipped: list) -> str:
    n = runs["status"].value_counts()
    lines = ["# distortkd results", "",
             f"{len(runs)} run folders under {', '.join(map(str, opts.dirs))}: {n.get('ok', 0)} "
             f"finished, {n.get('failed', 0)} failed, {n.get('missing', 0)} without metrics.json.",
             "", *sections]
    lines += ["## Figures", "", *(f"- `{p.name}`" for p in made), ""] if made else []
    lines += ["## Skipped", "", *skipped, ""] if skipped else []
    bad = runs[runs["status"].ne("ok")]
    lines += ["## Failed or unfinished runs", ""] if len(bad) else []
    lines += [f"- `{r.path}`: {r.status} ({r.error})" for r in bad.itertuples()]
    return "\n".join(lines).rstrip() + "\n"


def _wanted(opts) -> list[str]:
    if not opts.only:
        return list(LAYOUTS[opts.layout])
    names = [ALIASES.get(n.strip(), n.strip()) for n in opts.only.split(",") if n.strip()]
    for name in names:
        if name not in TABLES and name not in FIGURES:
            raise unknown("report part", name, [*TABLES, *FIGURES, *ALIASES])
    return names


def build(opts) -> str:
    """Writes ``tables/<name>.tex``, the figures and ``results.md`` under ``opts.out``.

    Returns:
        The markdown of ``results.md``.
    """
    runs, rows = scan(opts.dirs)
    if runs.empty:
        raise UserError(f"no run folders (with config.yaml) under {', '.join(map(str, opts.dirs))}")
    (opts.out / "tables").mkdir(parents=True, exist_ok=True)
    sections, made, skipped = [], [], []
    for name in _wanted(opts):
        try:
            if name in TABLES:
                tables = TABLES[name](runs, rows, opts)
                for t in tables:
                    (opts.out / "tables" / f"{t.name}.tex").write_text(to_latex(t))
                sections += [to_markdown(t) for t in tables]
                found = bool(tables)
            else:
                paths = make_figure(name, runs, rows, opts, opts.out)
                made, found = made + paths, bool(paths)
        except (ValueError, KeyError, OSError) as err:  # a malformed file costs its part only
            skipped.append(f"- `{name}`: skipped, {type(err).__name__}: {err}")
            continue
        if not found:
            skipped.append(f"- `{name}`: skipped, no matching runs")
    text = _document(opts, runs, sections, made, skipped)
    (opts.out / "results.md").write_text(text)
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distortkd-report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders searched for run folders")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (./report)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="paper")
    p.add_argument("--only", help=f"comma-separated: {', '.join([*TABLES, *FIGURES, *ALIASES])}")
    p.add_argument("--metric", default="test/acc1", help="test/acc1 falls back to val/acc1")
    p.add_argument("--experiment", help="only this experiment's runs (drops default data filters)")
    p.add_argument("--data", help="only runs on this dataset")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distortkd-report``; returns the exit status (2 for a user error)."""
    opts = _parser().parse_args(argv)
    try:
        text = build(opts)
    except UserError as err:
        print(f"distortkd-report: error: {err}", file=sys.stderr)
        return 2
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
