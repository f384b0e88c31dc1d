"""The paper's tables and figures, defined on the run frames of :mod:`distortkd.runs`: which runs
each one takes (its definition, e.g. all labels, strong presets), its rows, columns and labels.

Selection and grouping (values, variants, settings) live in :mod:`distortkd.selection`; pivots and
rendering in :mod:`distortkd.tables` and :mod:`distortkd.figures`; the command line and the document
in :mod:`distortkd.report`. Each table function takes ``(runs, rows, opts)`` and returns a list of
:class:`~distortkd.tables.Table` (empty: no matching runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from distortkd import curves, figures
from distortkd.runs import ROW_METRICS
from distortkd.selection import (
    METHODS,
    baselines,
    finetune,
    in_domain,
    main_loss,
    ranked,
    scope,
    tagged,
    why_missing,
    with_curves,
    with_value,
    with_variant,
)
from distortkd.tables import MISSING, Table, make_tables, setting_labels


# Families, labels, presets and strong presets are read from the families' records at each call
# (``distortions.families()``), so a newly registered family appears in every table below. Imported
# when first needed: the records live with the distortions, which import torch.
def _families() -> dict[str, tuple[str, str]]:
    """``{family: (short, label)}`` in registration order."""
    from distortkd import distortions

    return {name: (r.short, r.label) for name, r in distortions.families().items()}


def _presets() -> list[str]:
    """Every preset: those of the families with a severity axis first (the paper's order)."""
    from distortkd import distortions

    fams = distortions.families()
    return sorted(distortions.PRESETS, key=lambda p: fams[distortions.PRESETS[p][0]].param is None)


def _strong() -> list[str]:
    """Each family's strong preset (tables 2 and 3; the students' order in the k-NN table, the
    other students following sorted)."""
    from distortkd import distortions

    return [r.strong for r in distortions.families().values() if r.strong]


TRANSFER = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10",
            "resisc45": "RESISC45", "camelyon17": "Camelyon17"}
LOSSES = {"global": "Global", "global_local": "Gl. Local", "global_attn": "Gl. Attention",
          "multilevel": "Gl. Local Attention"}
REPRESENTATION = {"val/cos_clean_baseline": "Before: teacher(distorted) vs teacher(clean)",
                  "val/cos_clean": "After: student(distorted) vs teacher(clean)"}


def _method(m: str) -> str:
    return METHODS.get(m, m)


def _family(f: str, short: bool = False) -> str:
    return _families().get(f, (f, f))[0 if short else 1]


def table1(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 1, in-domain (fine-tuned on the distillation data): distortion preset × method with
    all labels, one table per dataset."""
    sel, what = with_value(main_loss(in_domain(finetune(runs, opts, True))), opts.metric)
    return make_tables("table1", "Table 1: in-domain accuracy (%)", sel, "distortion.name",
                       "method", "Distortion", what, orders=(_presets(), METHODS),
                       per=("data.name",), col_label=_method)


def table2(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 2, transfer: (method, family of the strong preset) × downstream dataset: every
    dataset other than the one the student was distilled on (``pretrain.data``), all labels."""
    sel = main_loss(in_domain(finetune(runs, opts, True), transfer=True))
    sel, what = with_value(sel[sel["distortion.name"].isin(_strong())], opts.metric)
    names = {**METHODS, "supervised": "Baseline"}
    label = lambda k: f"{names.get(k[1], k[1])} ({_family(k[0], True)})"  # noqa: E731
    order = ([(f, m) for f in _families() for m in METHODS], TRANSFER)
    return make_tables("table2", "Table 2: transfer accuracy (%)", sel,
                       ["distortion.family", "method"], "data.name", "Method", what, orders=order,
                       row_label=label,
                       col_label=lambda d: TRANSFER.get(d, d))


def table3(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 3, loss ablation of our method: loss × family of the strong preset, with all
    labels, one table per dataset."""
    sel = in_domain(finetune(runs, opts, True))
    sel = sel[sel["method"].eq("ours") & sel["distortion.name"].isin(_strong())]
    sel, what = with_value(sel, opts.metric)
    return make_tables("table3", "Table 3: loss ablation, accuracy (%)", sel, "loss.name",
                       "distortion.family", "Loss", what, orders=(LOSSES, _families()),
                       per=("data.name",), row_label=lambda k: LOSSES.get(k, k), col_label=_family)


def _seed_errors(rows: pd.DataFrame, metric: str) -> pd.Series:
    """``err = 1 − metric`` per (setting, distortion, severity), averaged over seeds (a seed that
    ran twice first; a run of unknown seed counts as its own seed)."""
    seed = rows["seed"].astype(str).where(rows["seed"].notna(), rows["path"])
    keys = ["setting", "distortion", "severity"]
    return 1 - rows.assign(_seed=seed).groupby([*keys, "_seed"])[metric].mean().groupby(level=keys).mean()


def mce(rows: pd.DataFrame, metric: str = "acc1") -> tuple[pd.DataFrame, list]:
    """Corruption errors ×100 relative to each model's own supervised baseline, as in ImageNet-C.

    ``CE_c = Σ_s err(c, s) / Σ_s err_sup(c, s)`` with ``err = 1 − accuracy`` averaged over seeds
    (a seed that ran twice first), over the severities both have; ``mCE = mean_c CE_c`` over the
    corruptions a model has. The baseline is the supervised runs of the model's setting but
    method/init (:func:`distortkd.selection.baselines`), pooled over seeds only.

    Returns:
        The table (index: corruption names, then ``mCE``; columns: ``variant`` labels, added if
        absent, tagged where a variant holds two settings), and ``(path, reason)`` of every run
        left out for want of one baseline.
    """
    rows = rows if "variant" in rows else with_variant(rows)
    rows = rows.dropna(subset=["distortion", "severity", metric])
    base, why = baselines(rows)
    left = list(dict.fromkeys(zip(rows["path"][why.notna()], "mCE: " + why[why.notna()], strict=True)))
    rows = rows.assign(_base=base)[base.notna()]
    rows = rows.assign(_col=tagged(rows["variant"], setting_labels(rows, ["variant"], ["variant"])))
    err = _seed_errors(rows, metric)
    ce = {}
    for col, part in rows.groupby("_col", sort=False):  # one setting per column (see above)
        mine, ref = err.loc[part["setting"].iat[0]], err.loc[part["_base"].iat[0]]
        common = mine.index.intersection(ref.index)
        ce[col] = mine[common].groupby(level=0).sum() / ref[common].groupby(level=0).sum() * 100
    table = pd.DataFrame(ce)
    if not table.empty:
        table.loc["mCE"] = table.mean()
    return table, left


# The benchmark's own measure per clean dataset: ImageNet-C normalises by AlexNet's errors;
# CIFAR-10-C / CIFAR-100-C (and anything else) report the unnormalised mean error.
BENCHMARK_MEASURES = {
    "alexnet": ("corruption error vs AlexNet (the benchmark's mCE)",
                "CE_c = Σ_s err / Σ_s err(AlexNet, ImageNet-C) × 100 over severities 1-5, errors averaged "
                "over seeds; mCE = mean over the 15 benchmark corruptions (— unless all 15 × 5 are there). "
                "AlexNet's errors are on the 1000-class ImageNet-C; no supervised baseline involved."),
    "mean": ("mean corruption error, unnormalised (the benchmark's mCE)",
             "CE_c = mean_s err × 100 over severities 1-5, errors averaged over seeds; mCE = mean over the "
             "15 benchmark corruptions (— unless all 15 × 5 are there), as CIFAR-10-C / CIFAR-100-C "
             "report it (AlexNet's errors are ImageNet-C's); no supervised baseline involved."),
}


def benchmark_mce(rows: pd.DataFrame, metric: str = "acc1") -> dict[str, tuple[pd.DataFrame, list]]:
    """The benchmark's corruption errors ×100 per model (see ``BENCHMARK_MEASURES``): per measure,
    a table (index: the 15 benchmark corruptions, then ``mCE``; columns: ``variant`` labels) and
    the columns whose mCE is missing with the corruptions they lack."""
    # Imported here: distortkd.benchmarks loads torch and datasets, which the report never needs.
    from distortkd.benchmarks import (
        BENCHMARK_CORRUPTIONS,
        LEVELS,
        mce_vs_alexnet,
        mean_corruption_error,
    )

    rows = rows if "variant" in rows else with_variant(rows)
    rows = rows.dropna(subset=["distortion", "severity", metric])
    rows = rows.assign(_col=tagged(rows["variant"], setting_labels(rows, ["variant"], ["variant"])))
    err, out = _seed_errors(rows, metric), {}
    for col, part in rows.groupby("_col", sort=False):
        mine = err.loc[part["setting"].iat[0]]
        kind = "alexnet" if str(part["data.name"].iat[0]).startswith("imagenet") else "mean"
        errors = {c: [mine.get((c, s), np.nan) for s in LEVELS] for c in BENCHMARK_CORRUPTIONS
                  if c in mine.index.get_level_values(0)}
        total, ce = (mce_vs_alexnet if kind == "alexnet" else mean_corruption_error)(errors)
        table, lacking = out.setdefault(kind, ({}, []))
        table[col] = pd.Series({**ce, "mCE": total}, dtype=float).reindex([*BENCHMARK_CORRUPTIONS, "mCE"])
        if np.isnan(total):
            lacking.append(f"{col} (no benchmark mCE: lacks "
                           f"{', '.join(c for c in BENCHMARK_CORRUPTIONS if c not in ce)} at some severity 1-5)")
    return {kind: (pd.DataFrame(table), lacking) for kind, (table, lacking) in out.items()}


def _cells(table: pd.DataFrame) -> pd.DataFrame:
    return table.map(lambda v: MISSING if pd.isna(v) else f"{v:.1f}")


def _mce_table(sel: pd.DataFrame, tables: list[Table], title: str = "Held-out corruptions",
               suffix: str = "") -> None:
    """Appends the CE/mCE table relative to the supervised baseline to ``tables``, then beside it
    the benchmark's own (:func:`benchmark_mce`); runs without a baseline go to the relative
    table's ``left_out`` (or, with no table, to the accuracy table's) and their models to its
    missing list."""
    ce, left = mce(sel)
    if not ce.empty:
        note = ("CE_c = Σ_s err / Σ_s err(Supervised of the same setting but method/init) × 100, "
                "errors averaged over seeds; mCE = mean.")
        tables.append(Table("mce" + suffix, f"{title}: corruption error (mCE), relative to Supervised",
                            _cells(ce), "Corruption", footnote=note))
    lost = sel[sel["path"].isin({p for p, _ in left})]["variant"].unique()
    tables[-1].missing += [f"{v} (no mCE: no single supervised baseline, see Left out)" for v in lost]
    tables[-1].left_out += left
    for kind, (table, lacking) in benchmark_mce(sel).items():
        heading, note = BENCHMARK_MEASURES[kind]
        tables.append(Table(f"mce_{kind}{suffix}", f"{title}: {heading}", _cells(table), "Corruption",
                            missing=lacking, footnote=note))


def heldout(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Held-out corruptions: accuracy per corruption × severity per model, then CE and mCE; one
    set of tables per suite (regenerated, and each published benchmark's files)."""
    from distortkd.benchmarks import BENCHMARKS  # here: see benchmark_mce

    titles = {"heldout": ("Held-out corruptions", ""),
              **{k: (f"{b.title} (published files)", f"_{k}") for k, b in BENCHMARKS.items()}}
    tables = []
    for suite, (title, suffix) in titles.items():
        sel = with_variant(scope(rows[rows["suite"].eq(suite)], opts))
        sel = sel.assign(variant=tagged(sel["variant"],
                                        setting_labels(sel, ["distortion", "severity", "variant"], ["variant"])))
        made = make_tables("heldout" + suffix, f"{title}: accuracy (%)", sel,
                           ["distortion", "severity"], "variant", "Corruption / severity",
                           "`acc1` of evaluate rows in %", value="acc1", split=(),
                           orders=(None, list(dict.fromkeys(sel["variant"]))),
                           row_label=lambda k: f"{k[0]} / {k[1]:g}")
        if made:
            _mce_table(sel, made, title, suffix)
        tables += made
    return tables


def _teacher_setting(setting: object) -> object:
    """What a teacher reference row depends on: the model and the data (the row gives the
    distortion), not which student the evaluate run scored; so they pool across students."""
    if not isinstance(setting, str):
        return setting
    keep = {k: v for k, v in json.loads(setting).items() if k.startswith(("model.", "data."))}
    return json.dumps(keep, sort_keys=True)


def diagnostics(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Representation diagnostics per model × distortion, averaged over severities per seed; the
    rows' ``teacher_*`` values (teacher on distorted vs on clean) give a "Teacher" reference."""
    sel = with_variant(scope(rows, opts))
    present = [m for m in ROW_METRICS if m in sel and sel[m].notna().any()]
    pre = {f"teacher_{m}": m for m in present if f"teacher_{m}" in sel}
    if pre:
        teacher = sel.drop(columns=present).rename(columns=pre).assign(
            variant="Teacher (distorted)", setting=sel["setting"].map(_teacher_setting))
        sel = pd.concat([teacher, sel], ignore_index=True)
    ids = ["variant", "distortion", "seed", "path", "status", "setting"]
    long = sel.melt(id_vars=ids, value_vars=present,
                    var_name="metric", value_name="v").dropna(subset=["v"])
    order = list(long[["variant", "distortion"]].itertuples(index=False, name=None))
    return make_tables("diagnostics", "Diagnostics (evaluate rows)", long,
                       ["variant", "distortion"], "metric", "Model / distortion",
                       "per-seed mean over severities", value="v", split=(),
                       orders=(order, ROW_METRICS), scale=1.0, digits=3)


def demo(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Demo: (distortion, label fraction) × method, and Δ = Ours − Supervised (of the means)."""
    sel, what = with_value(curves.demo_finetunes(runs, opts), opts.metric)
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


def representation(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Cosine to the clean teacher before (teacher on distorted) and after (student) distilling."""
    sel = scope(runs[runs["task"].eq("distill") & runs["method"].eq("ours")], opts)
    ids = ["method", "distortion.name", "model.name", "loss.name", "seed", "path", "status",
           "setting", "bad"]
    long = sel.melt(id_vars=ids, value_vars=[m for m in REPRESENTATION if m in sel],
                    var_name="metric", value_name="v")  # NaN values stay: they are listed
    long = long.assign(_why=[why_missing(b, [m]) for b, m in zip(long["bad"], long["metric"], strict=True)])
    return make_tables("representation", "Representation: CLS cosine to the clean teacher", long,
                       "distortion.name", "metric", "Distortion", "validation-set cosine",
                       value="v", split=("model.name", "loss.name"),
                       orders=(_presets(), REPRESENTATION),
                       col_label=lambda m: REPRESENTATION.get(m, m), scale=1.0, digits=3)


def mixed(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Each family evaluated on (evaluate rows, any suite): our student distilled on that family
    ("specialist") vs our student distilled on ``mixed``; accuracy averaged over severities."""
    sel = scope(rows[rows["method"].eq("ours")], opts)
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
                       orders=(_families(), names), row_label=_family, col_label=names.get)


def robustness(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Fig. 2 as a table: accuracy per (family, severity) × method, from evaluate rows."""
    sel = scope(rows[rows["suite"].eq("paper")], opts)
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
    sel = scope(runs[runs["task"].eq("finetune") & runs["finetune.mode"].eq("knn")], opts)
    if sel.empty:
        return []
    sel, what = with_value(sel, opts.metric)
    return make_tables("knn",
                       "k-NN accuracy (%): student distilled on (columns) × evaluated on (rows)",
                       sel, "distortion.name", "pretrain.distortion", "Evaluated on", what,
                       orders=(_presets(), _strong()))


def figure_frame(name: str, runs: pd.DataFrame, rows: pd.DataFrame, opts) -> pd.DataFrame:
    """The data ``severity.png`` or ``labels.png`` is drawn from: one row per evaluate row (runs
    for labels), with ``curve``, the line it belongs to (:func:`distortkd.selection.with_curves`:
    a curve holds one setting, labelled like a table row)."""
    if name == "severity":
        sel = ranked(with_variant(scope(rows[rows["suite"].eq("paper")], opts)), "distortion", _families())
        return with_curves(sel, "distortion")
    sel = scope(runs[runs["status"].eq("ok")], opts)
    sel = main_loss(with_value(sel[sel["task"].eq("finetune")], opts.metric)[0])
    sel = ranked(with_variant(sel, ("distortion.name",)), "distortion.name", _presets())
    return with_curves(sel, "distortion.name", x="data.label_fraction")


def make_figure(name: str, runs: pd.DataFrame, rows: pd.DataFrame, opts, out: Path) -> list[Path]:
    """Draws ``severity.png`` (Fig. 2), ``labels.png`` (Fig. 3), ``attention*.png`` (Fig. 4) or the
    demo's ``steps.png`` (accuracy vs fine-tune steps)."""
    if name == "steps_figure":
        return curves.steps_figure(runs, rows, opts, out)
    if name == "severity":
        path = figures.severity_figure(figure_frame(name, runs, rows, opts), out / "severity.png",
                                       title=_family)
        return [path] if path else []
    if name == "labels":
        path = figures.labels_figure(figure_frame(name, runs, rows, opts), out / "labels.png")
        return [path] if path else []
    sel = scope(runs[runs["status"].eq("ok")], opts)  # one run's maps: nothing is pooled
    npz = [Path(p) / "attention.npz" for p in sel["path"] if (Path(p) / "attention.npz").is_file()]
    return figures.attention_figures(npz[0], out) if npz else []


TABLES = {"table1": table1, "table2": table2, "table3": table3, "heldout": heldout,
          "diagnostics": diagnostics, "demo": demo, "representation": representation,
          "mixed": mixed, "knn": knn, "robustness": robustness, "steps": curves.steps}
FIGURES = ("severity", "labels", "attention", "steps_figure")
LAYOUTS = {"paper": ("table1", "table2", "table3", "heldout", "diagnostics", *FIGURES[:3]),
           "demo": ("demo", "steps", "representation", "robustness", "diagnostics", "knn", "mixed",
                    "heldout", *FIGURES)}
ALIASES = {"fig2": "severity", "fig3": "labels", "fig4": "attention"}


# What each filtered table keeps, named when it is skipped so that its filter is never silent.
SCOPES = {"table1": "fine-tune runs on their distillation data (pretrain.data) with all labels "
                    "(data.label_fraction=1, unless --experiment)",
          "table2": "fine-tune runs of a strong preset on other data than pretrain.data, with all "
                    "labels unless --experiment",
          "table3": "our method's fine-tune runs of a strong preset on their distillation data, "
                    "with all labels unless --experiment",
          "demo": "fine-tune runs (full) of ours and supervised on a distortion"}


