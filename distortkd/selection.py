"""Which runs a report part reads, and how they are grouped: the value a run gives, the variant a
method's run belongs to, and the setting-aware labels that keep different settings apart.

Tables, figures and the mCE baseline group runs the same way: by the ``setting`` column (see
:func:`distortkd.rundir.setting`), tagged with :func:`distortkd.tables.setting_labels` where two
settings would otherwise share a cell, a curve or a baseline. Nothing here knows the paper's tables;
:mod:`distortkd.paper` does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from distortkd.tables import differing, setting_labels

METHODS = {"ci": "CI", "supervised": "Supervised", "ours": "Ours"}
# Settings that say which model a run trained or evaluated (the method, the student it started from,
# and for an evaluate run the fine-tuned checkpoint, whose path names the method): a student and its
# supervised baseline differ only in these. Everything else (data, model, the distortion it was
# fine-tuned on, label fraction, fine-tune mode, evaluation suite, ...) must be equal.
INIT_KEYS = ("method", "init", "loss.", "pretrain.", "ckpt")


def why_missing(bad: object, names: Sequence[str]) -> str:
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
    why = df["bad"].map(lambda b: why_missing(b, names)) if "bad" in df else f"no `{metric}`"
    return (df.assign(value=value.astype(float), _why=why),
            text + (" in %" if "acc" in metric else " ×100"))


def ranked(df: pd.DataFrame, column: str, order: Iterable) -> pd.DataFrame:
    """Stable sort by the position of ``column``'s value in ``order`` (other values last)."""
    rank = {v: i for i, v in enumerate(order)}
    return df.iloc[np.argsort(df[column].map(rank).fillna(len(rank)).to_numpy(), kind="stable")]


def with_variant(df: pd.DataFrame, exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Adds column ``variant``: the method's name plus the fields that vary within the method
    (e.g. ``Ours (mixed)``), so that different students never share a line or column. Rows come
    back sorted by method (CI, Supervised, Ours, others), so variants appear in that order."""
    fields = ("distortion.name", "loss.name", "model.name", "data.name", "finetune.mode")
    fields = [f for f in fields if f not in exclude]
    df = ranked(df, "method", METHODS)
    base = df["method"].map(lambda m: METHODS.get(m, str(m)))
    if df.empty:
        return df.assign(variant=base)
    varies = {f: df.groupby("method", dropna=False)[f].transform("nunique") > 1 for f in fields}
    parts = pd.concat([df[f].astype(str).where(v, "") for f, v in varies.items()], axis=1)
    extra = parts.apply(lambda r: ", ".join(x for x in r if x), axis=1)
    return df.assign(variant=base.where(extra.eq(""), base + " (" + extra + ")"))


def tagged(labels: pd.Series, tags: pd.Series) -> pd.Series:
    """``label [tag]`` (the label alone where the tag is empty): how settings are told apart."""
    return labels + tags.map(lambda t: f" [{t}]" if t else "")


def without_keys(setting: object, keys: Sequence[str]) -> object:
    """A JSON setting without ``keys`` (a key ending in ``.`` drops its whole group); an unknown
    setting (None, or a path standing in for one) is returned as it is."""
    if not isinstance(setting, str) or not setting.startswith("{"):
        return setting
    drop = lambda k: k in keys or k.startswith(tuple(p for p in keys if p.endswith(".")))  # noqa: E731
    return json.dumps({k: v for k, v in json.loads(setting).items() if not drop(k)}, sort_keys=True)


def with_curves(df: pd.DataFrame, panel: str, x: str | None = None) -> pd.DataFrame:
    """Adds column ``curve``: the ``variant``, tagged like a table row (``Ours [key=value]``)
    where runs of one panel and variant differ in a setting other than ``x`` (the x axis's own
    setting, e.g. ``data.label_fraction``), so that a curve never joins two settings."""
    if df.empty or "setting" not in df:
        return df.assign(curve=df.get("variant", pd.Series(dtype=object)))
    keyed = df.assign(setting=df["setting"].map(lambda s: without_keys(s, (x,) if x else ())))
    return df.assign(curve=tagged(df["variant"], setting_labels(keyed, [panel, "variant"], ["variant"])))


def baselines(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Which supervised setting each row's model is measured against (for mCE).

    Returns:
        ``(baseline, why)`` per row: the setting of the supervised runs whose setting equals the
        row's except :data:`INIT_KEYS` (a supervised row: its own), else None, and why not — no
        such run, or several of different settings (never merged).
    """
    sup = rows[rows["method"].eq("supervised")]
    found = sup.groupby(sup["setting"].map(lambda s: without_keys(s, INIT_KEYS)))["setting"].unique()
    pairs = {}
    for method, setting in set(zip(rows["method"], rows["setting"], strict=True)):
        cands = [setting] if method == "supervised" else list(found.get(without_keys(setting, INIT_KEYS), []))
        if len(cands) == 1:
            pairs[method, setting] = (cands[0], None)
        elif cands:
            key, vals = next(iter(differing(cands).items()))
            pairs[method, setting] = (None, f"{len(cands)} candidate supervised baselines of different "
                                            f"settings (key {key}: {' vs '.join(map(str, dict.fromkeys(vals)))}), never merged")
        else:
            pairs[method, setting] = (None, "no supervised run of its setting but method/init (data, model, "
                                            "distortion, label fraction, fine-tune mode, suite, ...)")
    both = [pairs[k] for k in zip(rows["method"], rows["setting"], strict=True)]
    return (pd.Series([b for b, _ in both], index=rows.index, dtype=object),
            pd.Series([w for _, w in both], index=rows.index, dtype=object))


def scope(df: pd.DataFrame, opts) -> pd.DataFrame:
    """Runs of ``--experiment`` and ``--data`` when given."""
    df = df[df["experiment"].eq(opts.experiment)] if opts.experiment else df
    return df[df["data.name"].eq(opts.data)] if opts.data else df


def finetune(runs: pd.DataFrame, opts, all_labels: bool) -> pd.DataFrame:
    """Fine-tuning runs of ``--experiment``, else (with ``all_labels``) those with all labels;
    every dataset is kept: a table is built from whatever its runs used."""
    sel = scope(runs[runs["task"].eq("finetune")], opts)
    return sel[sel["data.label_fraction"].eq(1.0)] if all_labels and not opts.experiment else sel


def in_domain(df: pd.DataFrame, transfer: bool = False) -> pd.DataFrame:
    """Runs fine-tuned on the data their student was distilled on (``pretrain.data``; unknown
    counts as in-domain), or with ``transfer`` on other data: a rule, not a list of datasets."""
    other = df["pretrain.data"].notna() & df["pretrain.data"].ne(df["data.name"])
    return df[other] if transfer else df[~other]


def main_loss(df: pd.DataFrame) -> pd.DataFrame:
    """Our method with the full multi-level loss only: ablation students stay out of its column."""
    return df[df["method"].ne("ours") | df["loss.name"].eq("multilevel")]
