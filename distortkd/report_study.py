"""``distortkd-report <runs>/study --layout study``: the study's verdicts, tables and figures.

Reads the study's run folders (:mod:`distortkd.runs`): the fine-tunes (``test/acc1`` at their
training distortion, ``csv/metrics.csv`` for accuracy vs steps) and the evaluate folders that
``python -m distortkd.study evaluate`` wrote (rows per cell, ``stage`` finetuned or distilled).

A *recipe* is a distilled student: (distillation distortion, fine-tune distortion, loss). Its
*baseline* is the supervised fine-tune of the teacher on the same fine-tune distortion and labels.
Every comparison is paired on the seed (seed k of the student against seed k of the baseline;
both saw the same corrupted test images): mean ± sample std of the paired differences, and
``scipy.stats.ttest_rel`` over the seeds. The held-out question is also paired over (seed x
corruption), which treats the corruptions as independent draws of "a corruption never seen" (they
share one model per seed, so that p-value is optimistic). Each verdict's wording follows the sign
and the significance of the numbers it reports (alpha 0.05), never a fixed text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats

from distortkd import rundir
from distortkd.curves import _curve
from distortkd.errors import UserError
from distortkd.figures import _panels, _save
from distortkd.runs import scan

ALPHA = 0.05
MAIN_LOSS = "multilevel"
# Recipe kinds by the name prefix of the study's distortion files (distortkd/conf/distortion/study_*).
KINDS = (("study_range_", "range"), ("study_lofo_", "leave one out"), ("study_mixed", "mixed"))
RECIPE = ["pretrain.distortion", "distortion.name", "loss.name"]


@dataclass(frozen=True)
class Paired:
    """Paired differences a − b: mean, sample std, their count and the paired t-test's p."""

    mean: float
    std: float
    n: int
    p: float

    def text(self, scale: float = 100.0, unit: str = " pts", digits: int = 1) -> str:
        if not self.n:
            return "—"
        std = f" ± {self.std * scale:.{digits}f}" if self.n > 1 else ""
        p = f", p = {self.p:.3f}" if math.isfinite(self.p) else ""
        return f"{self.mean * scale:+.{digits}f}{std}{unit} (n = {self.n}{p})"


def paired(a: pd.Series, b: pd.Series) -> Paired:
    """``a`` vs ``b`` on their common index (seeds, or (seed, corruption) pairs)."""
    common = a.dropna().index.intersection(b.dropna().index)
    x, y = a[common].to_numpy(float), b[common].to_numpy(float)
    d = x - y
    if not len(d):
        return Paired(math.nan, math.nan, 0, math.nan)
    std = float(d.std(ddof=1)) if len(d) > 1 else math.nan
    p = float(stats.ttest_rel(x, y).pvalue) if len(d) > 1 and std > 0 else math.nan
    return Paired(float(d.mean()), std, len(d), p)


def verdict(result: Paired, up: str, down: str) -> str:
    """``up`` / ``down`` when the paired test says so at ALPHA, otherwise no established difference."""
    if result.n < 2 or not math.isfinite(result.p):
        return f"undetermined ({result.n} pair{'s' * (result.n != 1)} with a spread to test)"
    if result.p < ALPHA:
        return up if result.mean > 0 else down
    return "no significant difference"


def detectable_effect(n: int, power: float = 0.8) -> float:
    """The paired effect size d (mean difference / std of the differences) that a two-sided
    t-test at ALPHA detects with ``power`` from ``n`` pairs (noncentral t)."""
    if n < 2:
        return math.inf
    crit = stats.t.ppf(1 - ALPHA / 2, n - 1)
    # The far tail (t < -crit) is negligible at 80 % power; scipy's nct is NaN there for large nc.
    gap = lambda d: stats.nct.sf(crit, n - 1, d * math.sqrt(n)) - power  # noqa: E731
    high = 20.0
    if not gap(high) > 0:  # n = 2 (df 1): no effect size within reach
        return math.inf
    return float(optimize.brentq(gap, 1e-6, high))


def kind(pretrain: str) -> str:
    return next((k for prefix, k in KINDS if pretrain.startswith(prefix)), "fixed")


def label(recipe: tuple) -> str:
    pre, target, loss = recipe
    name = pre if pre == target else f"{pre} → {target}"
    return f"{kind(pre)}: {name}" + ("" if loss == MAIN_LOSS else f" [{loss}]")


@cache
def _distortion(path: str) -> dict:
    cfg, why = rundir.read_config(path)
    if cfg is None:
        raise UserError(f"{path}: {why}")
    return cfg["distortion"]


def trained_max(dist: dict) -> dict[str, float]:
    """Family → the highest severity a distortion config trains on (families it never shows absent)."""
    from distortkd.distortions import families  # the records (imported here: they import torch)

    records = families()
    top = lambda v: float(max(v)) if isinstance(v, list | tuple) else float(v)  # noqa: E731
    params = dist.get("params") or {}
    if dist["family"] == "mixed":  # Mixed holds each family's range as ``<prefix>_<param>``
        fields = {f: f"{records[f].prefix}_{records[f].param}" for f in params["families"]
                  if f in records and records[f].param}
        return {f: top(params[field]) for f, field in fields.items() if field in params}
    record = records.get(dist["family"])
    if record is not None and record.param and record.param in params:
        return {dist["family"]: top(params[record.param])}
    return {}


def left_out(root: Path) -> list[str]:
    """One line per run folder that gives the study no value (failed, stopped, unfinished)."""
    runs, _ = scan([root])
    bad = runs[runs["status"].ne("ok")]
    return [f"- `{r.path}`: {r.status}" + (f", {r.error}" if isinstance(r.error, str) else "")
            for r in bad.itertuples()]


def load(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Finished full fine-tunes (one per run) and the study's evaluate rows."""
    runs, rows = scan([root])
    ok = runs[runs["status"].eq("ok")]
    tuned = ok[ok["task"].eq("finetune") & ok["finetune.mode"].eq("full")].copy()
    rows = rows[rows["suite"].eq("study")].copy() if "suite" in rows else rows.iloc[:0]
    if tuned.empty or rows.empty:
        raise UserError(f"no finished study fine-tunes and evaluations under {root}; run "
                        "experiments/study/run.sh (make study) first")
    return tuned, rows


def _students(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["method"].eq("ours")]


def _baseline(df: pd.DataFrame, target: str) -> pd.DataFrame:
    return df[df["method"].eq("supervised") & df["distortion.name"].eq(target)]


def per_seed(df: pd.DataFrame, value: str) -> pd.Series:
    return df.groupby("seed")[value].mean()


def recipes(tuned: pd.DataFrame, fraction: float) -> list[tuple]:
    s = _students(tuned[tuned["data.label_fraction"].eq(fraction)])
    order = {k: i for i, (_, k) in enumerate((("", "fixed"), *KINDS))}
    keys = sorted({tuple(r) for r in s[RECIPE].itertuples(index=False)},
                  key=lambda r: (r[2] != MAIN_LOSS, order[kind(r[0])], r[0]))
    return keys


def _of(df: pd.DataFrame, recipe: tuple) -> pd.DataFrame:
    mask = np.logical_and.reduce([df[k].eq(v) for k, v in zip(RECIPE, recipe, strict=True)])
    return _students(df[mask])


def at_training(tuned: pd.DataFrame, recipe: tuple, fraction: float) -> Paired:
    """Q1: test accuracy at the fine-tune distortion, student − baseline, paired on seeds."""
    lf = tuned[tuned["data.label_fraction"].eq(fraction)]
    return paired(per_seed(_of(lf, recipe), "test/acc1"), per_seed(_baseline(lf, recipe[1]), "test/acc1"))


def _cells(rows: pd.DataFrame, recipe: tuple, where) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The fine-tuned student's and its baseline's evaluate rows selected by ``where(rows, top)``
    (``top``: family → highest trained severity of the recipe's fine-tune distortion)."""
    tuned = rows[rows["stage"].eq("finetuned")]
    student = _of(tuned, recipe)
    if student.empty:
        return student, student
    top = trained_max(_distortion(student["path"].iloc[0]))
    base = _baseline(tuned, recipe[1])
    return student[where(student, top)], base[where(base, top)]


def beyond(rows: pd.DataFrame, recipe: tuple) -> Paired:
    """Q2: mean accuracy over the severities beyond the highest trained one, trained families only."""
    def where(df, top):
        limit = df["distortion"].map(top)
        return df["grid"].eq("severity") & limit.notna() & (df["severity"] > limit + 1e-9)
    s, b = _cells(rows, recipe, where)
    return paired(per_seed(s, "acc1"), per_seed(b, "acc1"))


def unseen_family(rows: pd.DataFrame, recipe: tuple) -> Paired:
    """Q3b: mean accuracy over every severity of the families the recipe never trained on."""
    def where(df, top):
        return df["grid"].eq("severity") & ~df["distortion"].isin(list(top))
    s, b = _cells(rows, recipe, where)
    return paired(per_seed(s, "acc1"), per_seed(b, "acc1"))


def _heldout(rows: pd.DataFrame, recipe: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _cells(rows, recipe, lambda df, top: df["grid"].eq("heldout"))


def mce(rows: pd.DataFrame, recipe: tuple) -> pd.Series:
    """Per seed: mean over held-out corruptions of Σ_severity error(student) / Σ error(baseline),
    x 100 (ImageNet-C's mCE with the seed's supervised baseline as the reference)."""
    s, b = _heldout(rows, recipe)
    err = lambda df: (1 - df["acc1"]).groupby([df["seed"], df["distortion"]]).sum()  # noqa: E731
    ratio = (err(s) / err(b)).dropna()
    return ratio.groupby(level="seed").mean() * 100


def heldout_error(rows: pd.DataFrame, recipe: tuple) -> tuple[Paired, Paired]:
    """Q3: held-out top-1 error, student − baseline: paired on seeds (mean over cells), and on
    (seed, corruption) (mean over severities)."""
    s, b = _heldout(rows, recipe)
    by_seed = paired(1 - per_seed(s, "acc1"), 1 - per_seed(b, "acc1"))
    cell = lambda df: 1 - df.groupby(["seed", "distortion"])["acc1"].mean()  # noqa: E731
    return by_seed, paired(cell(s), cell(b))


def recovery(rows: pd.DataFrame, recipe: tuple, metric: str) -> tuple[Paired, Paired]:
    """Q4: the distilled student (before fine-tuning) on distorted images vs the teacher on the same
    images, each compared with the teacher on the clean ones (``metric``: cos_cls, cka_cls):
    student − teacher over the recipe's trained families, and over the held-out corruptions."""
    pre, target, loss = recipe
    d = rows[rows["stage"].eq("distilled") & rows["distortion.name"].eq(pre) & rows["loss.name"].eq(loss)]
    if d.empty:
        empty = Paired(math.nan, math.nan, 0, math.nan)
        return empty, empty
    seen = list(trained_max(_distortion(d["path"].iloc[0])))
    out = []
    for part in (d[d["grid"].eq("severity") & d["distortion"].isin(seen)], d[d["grid"].eq("heldout")]):
        out.append(paired(per_seed(part, metric), per_seed(part, f"teacher_{metric}")))
    return out[0], out[1]


def heldout_recovery(rows: pd.DataFrame, recipe: tuple, metric: str) -> pd.Series:
    """Per seed: the distilled student's ``metric`` − the teacher's, mean over held-out cells."""
    pre, _, loss = recipe
    d = rows[rows["stage"].eq("distilled") & rows["grid"].eq("heldout") & rows["distortion.name"].eq(pre)
             & rows["loss.name"].eq(loss)]
    return per_seed(d, metric) - per_seed(d, f"teacher_{metric}")


def per_corruption(rows: pd.DataFrame, keys: list[tuple], metric: str) -> pd.DataFrame:
    """Held-out corruption x recipe: distilled student − teacher on distorted (``metric``), mean
    over severities and seeds."""
    d = rows[rows["stage"].eq("distilled") & rows["grid"].eq("heldout")]
    cols = {}
    for pre, _, loss in keys:
        part = d[d["distortion.name"].eq(pre) & d["loss.name"].eq(loss)]
        cols[label((pre, pre, loss)).split(" → ")[0]] = (part[metric] - part[f"teacher_{metric}"]).groupby(
            part["distortion"]).mean()
    return pd.DataFrame(cols)


def curves(tuned: pd.DataFrame, target: str, pre: str) -> pd.DataFrame:
    """Val accuracy vs fine-tune steps of the baseline and the student (``pre`` → ``target``),
    every label fraction: columns method, label fraction, seed, steps, val."""
    sel = tuned[tuned["distortion.name"].eq(target) & tuned["loss.name"].eq(MAIN_LOSS)
                & (tuned["method"].eq("supervised") | tuned["pretrain.distortion"].eq(pre))]
    parts = [_curve(r["path"]).assign(method=r["method"], fraction=r["data.label_fraction"], seed=r["seed"])
             for r in sel.to_dict("records")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _recipe_lines(results: dict[str, Paired], up: str, down: str) -> str:
    """One sentence: how many recipes ``up``, ``down`` or neither, naming them."""
    groups: dict[str, list[str]] = {}
    for name, r in results.items():
        groups.setdefault(verdict(r, up, down), []).append(name)
    parts = [f"{len(v)} of {len(results)} {k} ({'; '.join(v)})" for k, v in groups.items()]
    return ", ".join(parts) + "." if parts else "no recipe has the runs this needs."


def _mean_std(values: pd.Series, digits: int = 1) -> str:
    v = values.dropna().to_numpy(float)
    if not len(v):
        return "—"
    return f"{v.mean():.{digits}f}" + (f" ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else "")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in body), ""]


@dataclass
class Study:
    """Every per-recipe result of the study at the main label fraction."""

    keys: list[tuple]
    training: dict[str, Paired]
    beyond: dict[str, Paired]
    mce: dict[str, pd.Series]
    heldout: dict[str, tuple[Paired, Paired]]
    unseen: dict[str, Paired]
    cos: dict[str, tuple[Paired, Paired]]
    cka: dict[str, tuple[Paired, Paired]]


def analyse(tuned: pd.DataFrame, rows: pd.DataFrame, fraction: float) -> Study:
    keys = recipes(tuned, fraction)
    names = [label(k) for k in keys]
    each = lambda f: {n: f(k) for n, k in zip(names, keys, strict=True)}  # noqa: E731
    return Study(keys, each(lambda k: at_training(tuned, k, fraction)), each(lambda k: beyond(rows, k)),
                 each(lambda k: mce(rows, k)), each(lambda k: heldout_error(rows, k)),
                 {n: r for n, r in each(lambda k: unseen_family(rows, k)).items() if r.n},
                 each(lambda k: recovery(rows, k, "cos_cls")), each(lambda k: recovery(rows, k, "cka_cls")))


def verdicts(st: Study, n_seeds: int) -> list[str]:
    d = detectable_effect(n_seeds)
    held = {n: v[0] for n, v in st.heldout.items()}
    held_cells = {n: v[1] for n, v in st.heldout.items()}
    return [
        "## Verdicts", "",
        f"Paired on seeds ({n_seeds}): a two-sided paired t-test at {ALPHA} with {n_seeds} pairs detects, "
        f"with 80 % power, only a mean difference of at least {d:.1f}x the std of the differences; "
        "\"no significant difference\" is therefore weak evidence of no effect. The held-out error is also "
        "paired on (seed x corruption), which treats the corruptions as independent draws of \"a corruption "
        "never seen\"; they share one model per seed, so those p-values are optimistic.", "",
        "1. **At the training distortion** (test accuracy, student vs supervised baseline): "
        + _recipe_lines(st.training, "better", "worse"),
        "2. **Beyond the training severity** (mean accuracy over the severities above the highest "
        "trained one, trained families): " + _recipe_lines(st.beyond, "better", "worse"),
        "3. **Held-out corruptions** (top-1 error over every corruption x 5 severities, paired on seeds): "
        + _recipe_lines(held, "higher error", "lower error")
        + " Paired on seed x corruption: " + _recipe_lines(held_cells, "higher error", "lower error"),
        "   **Families never seen** (every severity of the families the recipe never trained on: "
        "the left-out one for leave one out, the other two for fixed and range): "
        + _recipe_lines(st.unseen, "better", "worse"),
        "4. **Does representation recovery transfer?** CLS cosine to the clean teacher, distilled "
        "student (before fine-tuning) vs the teacher itself on the same distorted images. On its trained "
        "families: " + _recipe_lines({n: v[0] for n, v in st.cos.items()}, "closer", "farther")
        + " On the held-out corruptions: " + _recipe_lines({n: v[1] for n, v in st.cos.items()}, "closer", "farther")
        + " Linear CKA, held-out: " + _recipe_lines({n: v[1] for n, v in st.cka.items()}, "higher", "lower"),
        "",
    ]


def recipe_table(st: Study) -> list[str]:
    body = []
    for name in st.training:
        body.append([name, st.training[name].text(), st.beyond[name].text(), _mean_std(st.mce[name]),
                     st.heldout[name][0].text(), st.heldout[name][1].text(),
                     st.unseen[name].text() if name in st.unseen else "—"])
    return ["## Per recipe: student − baseline (accuracy points; error points for held-out)", "",
            *_table(["Recipe", "At training distortion", "Beyond training severity", "mCE (baseline = 100)",
                     "Held-out error, by seed", "Held-out error, by seed x corruption",
                     "Families never seen"], body)]


def recovery_table(st: Study) -> list[str]:
    body = [[n, *(v.text(1, "", 3) for v in (*st.cos[n], *st.cka[n]))] for n in st.cos]
    return ["## Representation recovery: distilled student − teacher, each vs the teacher on clean images", "",
            *_table(["Recipe", "cos, trained families", "cos, held-out", "CKA, trained families",
                     "CKA, held-out"], body)]


def corruption_table(rows: pd.DataFrame, keys: list[tuple], metric: str) -> list[str]:
    df = per_corruption(rows, [k for k in keys if k[2] == MAIN_LOSS], metric)
    if df.empty:
        return []
    body = [[c, *(f"{v:+.3f}" for v in df.loc[c])] for c in df.index]
    return [f"## Per held-out corruption: {metric}, distilled student − teacher on distorted (mean over "
            "severities and seeds)", "", *_table(["Corruption", *df.columns], body)]


def _at(val: pd.Series, step: int) -> pd.Series:
    """Per seed, the val accuracy logged at ``step``."""
    return val.xs(step, level="steps")


def budget_rows(tuned: pd.DataFrame) -> list[dict]:
    """Per recipe and label fraction: the val gap at the first check and at the end, the test gap
    (best-val checkpoint), and each method's val change over the last ~100 steps (paired on seeds)."""
    out = []
    for fraction in sorted(tuned["data.label_fraction"].unique()):
        for key in (k for k in recipes(tuned, fraction) if k[2] == MAIN_LOSS):
            c = curves(tuned, key[1], key[0])
            c = c[c["fraction"].eq(fraction)]
            if c.empty or c["method"].nunique() < 2:
                continue
            val = c.groupby(["method", "seed", "steps"])["val"].mean()
            steps = sorted(c["steps"].unique())
            first, last = steps[0], steps[-1]
            back = min(steps, key=lambda s: abs(s - (last - 100)))
            s, b = val["ours"], val["supervised"]
            out.append({"recipe": label(key), "fraction": fraction, "first": first, "last": last, "back": back,
                        "early": paired(_at(s, first), _at(b, first)), "end": paired(_at(s, last), _at(b, last)),
                        "test": at_training(tuned, key, fraction),
                        "rise_base": paired(_at(b, last), _at(b, back)), "rise_ours": paired(_at(s, last), _at(s, back))})
    return out


def budget_section(tuned: pd.DataFrame) -> list[str]:
    rows = budget_rows(tuned)
    if not rows:
        return []
    body = [[r["recipe"], f"{r['fraction']:g}", r["early"].text(), r["end"].text(), r["test"].text(),
             f"{r['rise_base'].text()}: {verdict(r['rise_base'], 'still rising', 'falling')}",
             f"{r['rise_ours'].text()}: {verdict(r['rise_ours'], 'still rising', 'falling')}"] for r in rows]
    steps = f"steps {rows[0]['first']} / {rows[0]['last']}; change from step {rows[0]['back']}"
    return [f"## Fine-tune budget: student − baseline val accuracy early and at the end ({steps})", "",
            *_table(["Recipe", "Labels", "Val gap, first check", "Val gap, end", "Test gap (best-val ckpt)",
                     "Baseline, last ~100 steps", "Student, last ~100 steps"], body)]


def severity_figure(rows: pd.DataFrame, keys: list[tuple], path: Path) -> Path | None:
    """Per family: student − baseline accuracy vs severity, one line per recipe (mean over seeds)."""
    tuned = rows[rows["stage"].eq("finetuned") & rows["grid"].eq("severity")]
    families = list(dict.fromkeys(tuned["distortion"]))
    if not families:
        return None
    fig, axes = _panels(len(families), size=(4.6, 3.4))
    for ax, fam in zip(axes, families, strict=True):
        for key in (k for k in keys if k[2] == MAIN_LOSS):
            s, b = _of(tuned, key), _baseline(tuned, key[1])
            gap = (s[s["distortion"].eq(fam)].groupby("severity")["acc1"].mean()
                   - b[b["distortion"].eq(fam)].groupby("severity")["acc1"].mean()).dropna()
            if len(gap):
                ax.plot(gap.index, gap.to_numpy() * 100, marker="o", ms=3, label=label(key))
        tops = [trained_max(_distortion(p)).get(fam) for p in _students(tuned)["path"].unique()]
        if tops := [t for t in tops if t is not None]:  # right of it: beyond every recipe's training
            ax.axvline(max(tops), color="grey", ls=":", lw=1)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=fam, xlabel="severity", ylabel="student − baseline (pts)")
    axes[-1].legend(fontsize=6, loc="best")
    return _save(fig, path)


def bars_figure(values: dict[str, pd.Series], ref: float, xlabel: str, path: Path) -> Path | None:
    """Horizontal bars: mean ± std over seeds per recipe, a reference line at ``ref``."""
    values = {k: v.dropna() for k, v in values.items() if len(v.dropna())}
    if not values:
        return None
    fig, (ax,) = _panels(1, size=(6.5, 0.35 * len(values) + 1.2))
    names = list(values)
    means = [v.mean() for v in values.values()]
    errs = [v.std(ddof=1) if len(v) > 1 else 0 for v in values.values()]
    ax.barh(range(len(names)), means, xerr=errs, color="tab:blue", alpha=0.7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(ref, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    return _save(fig, path)


def steps_figure(tuned: pd.DataFrame, keys: list[tuple], path: Path) -> Path | None:
    """Val accuracy vs fine-tune steps (mean over seeds) of the recipe fine-tuned at every label
    fraction and its baseline."""
    fractions = tuned["data.label_fraction"].unique()
    key = next((k for k in keys if k[2] == MAIN_LOSS and all(
        len(_of(tuned[tuned["data.label_fraction"].eq(f)], k)) for f in fractions)), None)
    if key is None:
        return None
    c = curves(tuned, key[1], key[0])
    fig, (ax,) = _panels(1, size=(5.5, 3.6))
    for (method, fraction), part in c.groupby(["method", "fraction"]):
        mean = part.groupby("steps")["val"].mean() * 100
        ax.plot(mean.index, mean.to_numpy(), ls="-" if method == "ours" else "--",
                label=f"{'student' if method == 'ours' else 'supervised'}, {fraction:g} labels")
    ax.set(title=label(key), xlabel="fine-tune steps", ylabel="val accuracy (%)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _setup(tuned: pd.DataFrame, rows: pd.DataFrame, root: Path) -> list[str]:
    """What ran, read from the runs' own configs."""
    cfg, _ = rundir.read_config(tuned["path"].iloc[0])
    ev, _ = rundir.read_config(rows["path"].iloc[0])
    seeds = sorted(int(s) for s in tuned["seed"].dropna().unique())
    fractions = ", ".join(f"{f:g}" for f in sorted(tuned["data.label_fraction"].unique()))
    return [f"Run folders: `{root}`. Teacher: `{cfg['model']['weights_file']}`. Seeds {seeds}; "
            f"distillation and fine-tuning on train rows {cfg['data']['train_subset']} of "
            f"{cfg['data']['name']} (val: {cfg['data']['val_fraction']:g} of them); fine-tunes "
            f"{cfg['trainer']['max_steps']} steps x {cfg['data']['batch_size']} at label fractions "
            f"{fractions}, best-val checkpoint; every evaluation cell on the same "
            f"{ev['evaluation']['images']} corrupted test images (per-sample seeds).", ""]


def build(opts) -> str:
    """Writes ``results.md`` and the figures under ``opts.out`` from the run folders in
    ``opts.dirs``; returns the markdown."""
    root = opts.dirs[0]
    tuned, rows = load(root)
    main = float(rows.loc[rows["stage"].eq("finetuned"), "data.label_fraction"].mode().iloc[0])
    # Distilled students carry their distillation's label fraction (1.0): kept whatever ``main``.
    rows = rows[rows["stage"].eq("distilled") | rows["data.label_fraction"].eq(main)]
    st = analyse(tuned, rows, main)
    n_seeds = int(tuned["seed"].nunique())
    out = Path(opts.out)
    made = [severity_figure(rows, st.keys, out / "severity.png"),
            bars_figure(st.mce, 100, "held-out mCE (supervised baseline = 100)", out / "mce.png"),
            bars_figure({label(k): heldout_recovery(rows, k, "cos_cls") for k in st.keys}, 0,
                        "held-out CLS cosine to the clean teacher: distilled student − teacher",
                        out / "recovery.png"),
            steps_figure(tuned, st.keys, out / "steps.png")]
    lines = ["# Study: does the distilled student recover clean representations, or compensate for "
             "its one distortion?", "", *_setup(tuned, rows, root), *verdicts(st, n_seeds),
             *recipe_table(st), *recovery_table(st), *corruption_table(rows, st.keys, "cos_cls"),
             *corruption_table(rows, st.keys, "cka_cls"), *budget_section(tuned),
             "## Figures", "", *(f"![{p.stem}]({p.name})" for p in made if p is not None), ""]
    if bad := left_out(root):
        lines += ["## Left out", "", "Run folders without a finished result; no table uses them.", "", *bad, ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    return text
