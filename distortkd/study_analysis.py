"""The study's analysis (``make study``): recipes, their paired comparisons with the supervised
baseline, and the verdicts' statistics, on the run frames of :mod:`distortkd.runs`.

A *recipe* is a distilled student: (distillation distortion, fine-tune distortion, loss). Its
*baseline* is the supervised fine-tune of the teacher on the same fine-tune distortion and labels.
Every comparison is paired on the seed (seed k of the student against seed k of the baseline;
both saw the same corrupted test images): mean ± sample std of the paired differences, and
``scipy.stats.ttest_rel`` over the seeds. The held-out question is also paired over (seed x
corruption), which treats the corruptions as independent draws of "a corruption never seen" (they
share one model per seed, so that p-value is optimistic). :mod:`distortkd.report_study` renders it.
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
from distortkd.curves import read_curve
from distortkd.errors import UserError
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
                  key=lambda r: (r[2] != MAIN_LOSS, order[kind(r[0])], *r))
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
    parts = [read_curve(r["path"]).assign(method=r["method"], fraction=r["data.label_fraction"], seed=r["seed"])
             for r in sel.to_dict("records")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
