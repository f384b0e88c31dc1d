"""``distortkd-report``: the paper's tables and figures rebuilt from run folders alone (no W&B).

Run folders are read by :mod:`distortkd.runs`. A cell is the mean ± sample std (ddof=1) over
seeds of runs whose settings are identical but for the seed; a seed that ran twice with identical
settings is averaged first. Runs that land in the same cell with different settings are never
pooled: each setting gets its own row, tagged with the keys that tell them apart
(``noise_strong [distortion.params.sigma=0.05]``, see :mod:`distortkd.tables`); the held-out
tables tag the model column instead. ``n`` (the seed count in the footnote) counts pooled runs only.

Nothing is dropped silently: every run that gives a table no value — failed, stopped, unfinished,
a config that cannot be read, a metric that is missing, null, NaN or inf — is listed under
"Left out" with the reason, and its cell stays in the missing-cell list. Tables are built from
whatever datasets their runs used (one table per dataset for tables 1 and 3); the filters that
remain are each table's definition (e.g. all labels, strong presets), named when it is skipped.
Filter options that match no run, and unknown metrics, are errors (exit 2), never an empty report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from distortkd import figures
from distortkd.errors import UserError, unknown
from distortkd.runs import (  # noqa: F401  (re-exported: report.load_runs etc. are public)
    BASE_COLUMNS,
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
    setting_labels,
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


def _why(bad: object, names: Sequence[str]) -> str:
    """Why a finished run gives no value: the first of ``names`` it stored as null/NaN/inf, else
    that it has none of them."""
    bad = bad if isinstance(bad, dict) else {}
    stored = [f"`{n}` is {bad[n]}" for n in names if n in bad]
    return stored[0] if stored else "no " + " or ".join(f"`{n}`" for n in names)


def with_value(df: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, str]:
    """Adds column ``value``: ``metric``, or ``val/acc1`` for runs lacking ``test/acc1`` (not for
    runs that stored it as null/NaN/inf: those are left out), and ``_why`` (why a run has none).

    Returns:
        The frame, and a footnote text naming the metric(s) used and how many runs each filled.
    """
    names = [metric, *(["val/acc1"] if metric == "test/acc1" else [])]
    value, used = pd.Series(np.nan, index=df.index), {}
    stored_bad = df["bad"].map(lambda b: isinstance(b, dict) and metric in b) if "bad" in df \
        else pd.Series(False, index=df.index)
    for name in names:
        if name in df:
            fill = value.isna() & df[name].notna() & ~stored_bad
            used[name] = int((fill & df["status"].eq("ok")).sum())
            value = value.where(~fill, df[name])
    text = ", ".join(f"`{m}` ({k} runs)" for m, k in used.items() if k) or f"`{metric}`"
    why = df["bad"].map(lambda b: _why(b, names)) if "bad" in df else f"no `{metric}`"
    return (df.assign(value=value.astype(float), _why=why),
            text + (" in %" if "acc" in metric else " ×100"))


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


def _finetune(runs: pd.DataFrame, opts, all_labels: bool) -> pd.DataFrame:
    """Fine-tuning runs of ``--experiment``, else (with ``all_labels``) those with all labels;
    every dataset is kept: a table is built from whatever its runs used."""
    sel = _scope(runs[runs["task"].eq("finetune")], opts)
    return sel[sel["data.label_fraction"].eq(1.0)] if all_labels and not opts.experiment else sel


def _in_domain(df: pd.DataFrame, transfer: bool = False) -> pd.DataFrame:
    """Runs fine-tuned on the data their student was distilled on (``pretrain.data``; unknown
    counts as in-domain), or with ``transfer`` on other data: a rule, not a list of datasets."""
    other = df["pretrain.data"].notna() & df["pretrain.data"].ne(df["data.name"])
    return df[other] if transfer else df[~other]


def _main_loss(df: pd.DataFrame) -> pd.DataFrame:
    """Our method with the full multi-level loss only: ablation students stay out of its column."""
    return df[df["method"].ne("ours") | df["loss.name"].eq("multilevel")]


def _method(m: str) -> str:
    return METHODS.get(m, m)


def _family(f: str, short: bool = False) -> str:
    return FAMILIES.get(f, (f, f))[0 if short else 1]


def table1(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 1, in-domain (fine-tuned on the distillation data): distortion preset × method with
    all labels, one table per dataset."""
    sel, what = with_value(_main_loss(_in_domain(_finetune(runs, opts, True))), opts.metric)
    return make_tables("table1", "Table 1: in-domain accuracy (%)", sel, "distortion.name",
                       "method", "Distortion", what, orders=(PRESET_ORDER, METHODS),
                       per=("data.name",), col_label=_method)


def table2(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 2, transfer: (method, family of the strong preset) × downstream dataset: every
    dataset other than the one the student was distilled on (``pretrain.data``), all labels."""
    sel = _main_loss(_in_domain(_finetune(runs, opts, True), transfer=True))
    sel, what = with_value(sel[sel["distortion.name"].isin(STRONG)], opts.metric)
    names = {**METHODS, "supervised": "Baseline"}
    label = lambda k: f"{names.get(k[1], k[1])} ({_family(k[0], True)})"  # noqa: E731
    order = ([(f, m) for f in FAMILIES for m in METHODS], TRANSFER)
    return make_tables("table2", "Table 2: transfer accuracy (%)", sel,
                       ["distortion.family", "method"], "data.name", "Method", what, orders=order,
                       row_label=label,
                       col_label=lambda d: TRANSFER.get(d, d))


def table3(runs: pd.DataFrame, rows: pd.DataFrame, opts) -> list[Table]:
    """Table 3, loss ablation of our method: loss × family of the strong preset, with all
    labels, one table per dataset."""
    sel = _in_domain(_finetune(runs, opts, True))
    sel = sel[sel["method"].eq("ours") & sel["distortion.name"].isin(STRONG)]
    sel, what = with_value(sel, opts.metric)
    return make_tables("table3", "Table 3: loss ablation, accuracy (%)", sel, "loss.name",
                       "distortion.family", "Loss", what, orders=(LOSSES, FAMILIES),
                       per=("data.name",), row_label=lambda k: LOSSES.get(k, k), col_label=_family)


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
    tag = setting_labels(sel, ["distortion", "severity", "variant"], ["variant"])
    sel = sel.assign(variant=sel["variant"] + tag.map(lambda t: f" [{t}]" if t else ""))
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
    sel = with_variant(_scope(rows, opts))
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
    sel = _main_loss(_finetune(runs, opts, False))
    sel = sel[sel["finetune.mode"].fillna("full").eq("full") & sel["distortion.family"].ne("identity")]
    sel, what = with_value(sel[sel["method"].isin(["supervised", "ours"])], opts.metric)
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
    sel = _scope(runs[runs["task"].eq("distill") & runs["method"].eq("ours")], opts)
    ids = ["method", "distortion.name", "model.name", "loss.name", "seed", "path", "status",
           "setting", "bad"]
    long = sel.melt(id_vars=ids, value_vars=[m for m in REPRESENTATION if m in sel],
                    var_name="metric", value_name="v")  # NaN values stay: they are listed
    long = long.assign(_why=[_why(b, [m]) for b, m in zip(long["bad"], long["metric"], strict=True)])
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
          "mixed": mixed, "knn": knn, "robustness": robustness}
FIGURES = ("severity", "labels", "attention")
LAYOUTS = {"paper": ("table1", "table2", "table3", "heldout", "diagnostics", *FIGURES),
           "demo": ("demo", "representation", "robustness", "diagnostics", "knn", "mixed", "heldout",
                    *FIGURES)}
ALIASES = {"fig2": "severity", "fig3": "labels", "fig4": "attention"}


def make_figure(name: str, runs: pd.DataFrame, rows: pd.DataFrame, opts, out: Path) -> list[Path]:
    """Draws ``severity.png`` (Fig. 2), ``labels.png`` (Fig. 3) or ``attention*.png`` (Fig. 4)."""
    if name == "severity":
        sel = _ranked(with_variant(_scope(rows[rows["suite"].eq("paper")], opts)), "distortion",
                      FAMILIES)
        return [p for p in [figures.severity_figure(sel, out / "severity.png", title=_family)] if p]
    sel = _scope(runs[runs["status"].eq("ok")], opts)
    if name == "labels":
        sel = _main_loss(with_value(sel[sel["task"].eq("finetune")], opts.metric)[0])
        sel = _ranked(with_variant(sel, ("distortion.name",)), "distortion.name", PRESET_ORDER)
        return [p for p in [figures.labels_figure(sel, out / "labels.png")] if p]
    npz = [Path(p) / "attention.npz" for p in sel["path"] if (Path(p) / "attention.npz").is_file()]
    return figures.attention_figures(npz[0], out) if npz else []


# What each filtered table keeps, named when it is skipped so that its filter is never silent.
SCOPES = {"table1": "fine-tune runs on their distillation data (pretrain.data) with all labels "
                    "(data.label_fraction=1, unless --experiment)",
          "table2": "fine-tune runs of a strong preset on other data than pretrain.data, with all "
                    "labels unless --experiment",
          "table3": "our method's fine-tune runs of a strong preset on their distillation data, "
                    "with all labels unless --experiment",
          "demo": "fine-tune runs (full) of ours and supervised on a distortion"}


def _left_out(runs: pd.DataFrame, tables: dict[str, list[Table]]) -> list[str]:
    """One line per run folder that gives some table no value: path, reason(s), tables."""
    why: dict[str, dict[str, list[str]]] = {}
    for r in runs[runs["status"].ne("ok")].itertuples():
        why.setdefault(r.path, {}).setdefault(f"{r.status}: {r.error}", [])
    for name, made in tables.items():
        for path, reason in (x for t in made if t.pivot for x in t.pivot.left_out):
            names = why.setdefault(path, {}).setdefault(reason, [])
            names += [] if name in names else [name]
    return [f"- `{path}`: " + "; ".join(f"{r} ({', '.join(n)})" if n else r for r, n in rs.items())
            for path, rs in sorted(why.items())]


def _document(opts, runs: pd.DataFrame, sections: list, made: list, skipped: list,
              left: list[str]) -> str:
    n = runs["status"].value_counts()
    lines = ["# distortkd results", "",
             f"{len(runs)} run folders under {', '.join(map(str, opts.dirs))}: {n.get('ok', 0)} "
             f"finished, {n.get('failed', 0)} failed, {n.get('stopped', 0)} stopped, "
             f"{n.get('missing', 0)} without metrics.json.", "", *sections]
    lines += ["## Figures", "", *(f"- `{p.name}`" for p in made), ""] if made else []
    lines += ["## Skipped", "", *skipped, ""] if skipped else []
    note = "Run folders that give a table no value, and why (their cells are listed as missing)."
    lines += ["## Left out", "", note, "", *left] if left else []
    return "\n".join(lines).rstrip() + "\n"


def _wanted(opts) -> list[str]:
    if not opts.only:
        return list(LAYOUTS[opts.layout])
    names = [ALIASES.get(n.strip(), n.strip()) for n in opts.only.split(",") if n.strip()]
    for name in names:
        if name not in TABLES and name not in FIGURES:
            raise unknown("report part", name, [*TABLES, *FIGURES, *ALIASES])
    return names


def _metrics(runs: pd.DataFrame) -> set[str]:
    """The scalar metric names the scanned runs hold (``test/acc1`` whenever it can fall back)."""
    internal = {*BASE_COLUMNS, "value", "_why"}
    names = {c for c in runs.columns if c not in internal}
    return names | ({"test/acc1"} if "val/acc1" in names else set())


def _check_filters(opts, runs: pd.DataFrame) -> None:
    """Every filter option given names something the scanned runs hold, and together they match
    a run (``opts.metric`` None: the default, which a layout without fine-tunes need not hold)."""
    if opts.metric is not None and opts.metric not in _metrics(runs):
        raise unknown("--metric", opts.metric, _metrics(runs) or ["(no metrics in these runs)"])
    for flag, column in (("experiment", "experiment"), ("data", "data.name")):
        value = getattr(opts, flag)
        if value is not None and not runs[column].eq(value).any():
            raise unknown(f"--{flag}", value, sorted(set(runs[column].dropna().astype(str))))
    if _scope(runs, opts).empty:
        raise UserError(f"no run matches --experiment {opts.experiment!r} --data {opts.data!r} "
                        "together")


def build(opts) -> str:
    """Writes ``tables/<name>.tex``, the figures and ``results.md`` under ``opts.out``.

    Returns:
        The markdown of ``results.md``.
    """
    runs, rows = scan(opts.dirs)
    if runs.empty:
        raise UserError(f"no run folders (config.yaml, metrics.json or checkpoints/*.ckpt) under "
                        f"{', '.join(map(str, opts.dirs))}")
    _check_filters(opts, runs)
    opts.metric = opts.metric or "test/acc1"
    (opts.out / "tables").mkdir(parents=True, exist_ok=True)
    sections, made, skipped, done = [], [], [], {}
    for name in _wanted(opts):
        try:
            if name in TABLES:
                done[name] = tables = TABLES[name](runs, rows, opts)
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
            scope = f" (this table takes {SCOPES[name]})" if name in SCOPES else ""
            skipped.append(f"- `{name}`: skipped, no matching runs{scope}")
    text = _document(opts, runs, sections, made, skipped, _left_out(runs, done))
    (opts.out / "results.md").write_text(text)
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse adds a usage block; the house rule is one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distortkd-report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders searched for run folders")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (./report)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="paper")
    p.add_argument("--only", help=f"comma-separated: {', '.join([*TABLES, *FIGURES, *ALIASES])}")
    p.add_argument("--metric", help="a metric the runs hold (default test/acc1, falling back "
                   "to val/acc1)")
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
