"""Accuracy vs fine-tune steps, read from run folders' ``csv/metrics.csv`` (the demo's convergence
table and ``steps.png``): the evidence that both methods were fine-tuned to convergence, not
compared at a budget that favours the better starting point.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from distortkd import figures
from distortkd.selection import METHODS, finetune, main_loss, with_curves, with_value, with_variant
from distortkd.tables import MISSING, Table

CURVE_STEPS = (20, 40, 50, 100, 200, 300, 400, 600, 800, 1000)  # table columns (40: the old budget)


def demo_finetunes(runs: pd.DataFrame, opts) -> pd.DataFrame:
    """The demo table's runs: full fine-tunes of Supervised and Ours on a distortion."""
    sel = main_loss(finetune(runs, opts, False))
    sel = sel[sel["finetune.mode"].fillna("full").eq("full") & sel["distortion.family"].ne("identity")]
    return sel[sel["method"].isin(["supervised", "ours"])]


def read_curve(run: str) -> pd.DataFrame:
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
    sel, _ = with_value(demo_finetunes(runs[runs["status"].eq("ok")], opts), opts.metric)
    records = []
    for run in sel.to_dict("records"):
        curve = read_curve(run["path"])
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
    seeds. A run that stopped early has no value at later steps (—). Rows are (distortion, label
    fraction, curve): runs of different settings never share a row."""
    curves = steps_frame(runs, opts)
    if curves.empty:
        return []
    # The columns some run logged: the first check, then those of CURVE_STEPS (a column no run has
    # would be all "—", e.g. 20 and 40 when validation runs every 50 steps).
    logged = set(curves["steps"])
    shown = sorted({min(logged)} | {s for s in CURVE_STEPS if s in logged})
    cells = {}
    curves = curves.assign(rank=curves["method"].map({m: i for i, m in enumerate(METHODS)}))
    keys = ["distortion.name", "data.label_fraction", "curve"]
    for (name, frac, curve), part in curves.sort_values([*keys[:2], "rank"], kind="stable").groupby(
            keys, sort=False):
        at = {f"val @ {s}": _mean_std(part.loc[part["steps"].eq(s), "val"]) for s in shown}
        per_run = part.groupby("path")
        at["stopped at"] = _mean_std(per_run["steps"].max(), 0, 1.0)
        at["selected step"] = _mean_std(part.loc[part["selected"], "steps"], 0, 1.0)
        at["val (selected)"] = _mean_std(part.loc[part["selected"], "val"])
        at["test (selected)"] = _mean_std(per_run["value"].first())
        cells[f"{name} / {frac * 100:g}% / {curve}"] = at
    table = pd.DataFrame.from_dict(cells, orient="index")
    note = ("val/acc1 (%) on the val split carved from train (data.val_fraction); test (selected): "
            "test accuracy of the best-val checkpoint; mean ± std over seeds; steps of 128 images.")
    return [Table("steps", "Accuracy vs fine-tune steps", table, "Distortion / labels / method",
                  footnote=note)]


def steps_frame(runs: pd.DataFrame, opts) -> pd.DataFrame:
    """:func:`finetune_curves` with ``variant`` and ``curve`` (one curve per setting, as the
    report's other figures)."""
    curves = finetune_curves(runs, opts)
    if curves.empty:
        return curves
    curves = with_variant(curves.assign(**{"finetune.mode": "full"}), ("distortion.name",))
    panel = curves["distortion.name"].astype(str) + " / " + curves["data.label_fraction"].astype(str)
    return with_curves(curves.assign(_panel=panel), "_panel")


def steps_figure(runs: pd.DataFrame, rows: pd.DataFrame, opts, out: Path) -> list[Path]:
    """``steps.png``: accuracy vs fine-tune steps per (distortion, label fraction)."""
    curves = steps_frame(runs, opts)
    path = figures.steps_figure(curves, out / "steps.png") if not curves.empty else None
    return [path] if path else []
