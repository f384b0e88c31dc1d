"""``distortkd-report <runs>/study --layout study``: the study's verdicts, tables and figures.

Reads the study's run folders (:mod:`distortkd.runs`): the fine-tunes (``test/acc1`` at their
training distortion, ``csv/metrics.csv`` for accuracy vs steps) and the evaluate folders that
``python -m distortkd.study evaluate`` wrote (rows per cell, ``stage`` finetuned or distilled).
The comparisons and their statistics are :mod:`distortkd.study_analysis`'s; each verdict's wording
follows the sign and the significance of the numbers it reports (alpha 0.05), never a fixed text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from distortkd import rundir
from distortkd.figures import panels, save_figure
from distortkd.study_analysis import (
    ALPHA,
    MAIN_LOSS,
    Paired,
    _baseline,
    _distortion,
    _of,
    _students,
    at_training,
    beyond,
    curves,
    detectable_effect,
    heldout_error,
    heldout_recovery,
    label,
    left_out,
    load,
    mce,
    paired,
    per_corruption,
    per_seed,
    recipes,
    recovery,
    trained_max,
    unseen_family,
    verdict,
)


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


def _late_change(val: pd.Series, steps: list[int], since: float) -> tuple[int, Paired]:
    """The check nearest step ``since`` and, paired on seeds, the val accuracy at the last check
    minus that at it (``val`` indexed by seed and steps)."""
    back = min(steps, key=lambda s: abs(s - since))
    return back, paired(_at(val, steps[-1]), _at(val, back))


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
            s, b = val["ours"], val["supervised"]
            back, rise_base = _late_change(b, steps, last - 100)
            _, rise_ours = _late_change(s, steps, last - 100)
            out.append({"recipe": label(key), "fraction": fraction, "first": first, "last": last, "back": back,
                        "early": paired(_at(s, first), _at(b, first)), "end": paired(_at(s, last), _at(b, last)),
                        "test": at_training(tuned, key, fraction), "rise_base": rise_base, "rise_ours": rise_ours})
    return out


def convergence_rows(short: pd.DataFrame, long: pd.DataFrame) -> list[dict]:
    """The convergence check: per recipe fine-tuned at both budgets, label fraction and method,
    the test accuracy (best-val checkpoint) at the study's budget and at the long one, the change
    (paired on seeds), and the student − baseline gap at each budget."""
    out = []
    if long.empty:
        return out
    for fraction in sorted(long["data.label_fraction"].unique()):
        for key in (k for k in recipes(long, fraction) if k[2] == MAIN_LOSS):
            at = {}
            for budget, df in (("short", short), ("long", long)):
                lf = df[df["data.label_fraction"].eq(fraction)]
                at[budget] = {"student": per_seed(_of(lf, key), "test/acc1"),
                              "baseline": per_seed(_baseline(lf, key[1]), "test/acc1")}
            c = curves(long, key[1], key[0])  # the long runs' val curves: are they flat at the end?
            if len(c):
                c = c[c["fraction"].eq(fraction)]
            for who, method in (("baseline", "supervised"), ("student", "ours")):
                row = {"recipe": label(key), "fraction": fraction, "who": who,
                       "short": at["short"][who], "long": at["long"][who],
                       "change": paired(at["long"][who], at["short"][who]), "plateau": None}
                part = c[c["method"].eq(method)] if len(c) else c
                if len(part):
                    val = part.groupby(["seed", "steps"])["val"].mean()
                    steps = sorted(part["steps"].unique())
                    back, row["plateau"] = _late_change(val, steps, 0.75 * steps[-1])
                    row["plateau_steps"] = (back, steps[-1])
                out.append(row)
            out.append({"recipe": label(key), "fraction": fraction, "who": "gap",
                        "short": paired(at["short"]["student"], at["short"]["baseline"]),
                        "long": paired(at["long"]["student"], at["long"]["baseline"])})
    return out


def _pct(values: pd.Series) -> str:
    return _mean_std(values * 100) + " %" if len(values.dropna()) else "—"


def budget_section(short: pd.DataFrame, long: pd.DataFrame) -> list[str]:
    """The study's budget against the convergence check's longer one, then the val gap early and
    late at the study's budget for every recipe."""
    lines = []
    steps, long_steps = _steps(short), _steps(long)
    conv = convergence_rows(short, long)
    if conv:
        body = [[r["recipe"], f"{r['fraction']:g}", r["who"], _pct(r["short"]), _pct(r["long"]),
                 f"{r['change'].text()}: {verdict(r['change'], 'gains', 'loses')}",
                 "—" if r["plateau"] is None else
                 f"{r['plateau'].text()}: {verdict(r['plateau'], 'still rising', 'falling')}"]
                for r in conv if r["who"] != "gap"]
        last = next((r["plateau_steps"] for r in conv if r.get("plateau_steps")), None)
        quarter = f"val, step {last[0]} → {last[1]}" if last else "val, last quarter"
        gaps = [[r["recipe"], f"{r['fraction']:g}", r["short"].text(), r["long"].text()]
                for r in conv if r["who"] == "gap"]
        lines += [f"## Fine-tune budget: {steps} steps (every recipe) vs {long_steps} steps (convergence check)", "",
                  f"Test accuracy of the best-val checkpoint, mean ± std over seeds; each budget is its own "
                  f"run with its own cosine schedule. \"gains\" at {long_steps} steps means {steps} was not "
                  "converged for that method.", "",
                  *_table(["Recipe", "Labels", "Method", f"{steps} steps", f"{long_steps} steps",
                           f"{long_steps} − {steps}", f"Long run: {quarter}"], body),
                  *_table(["Recipe", "Labels", f"Student − baseline at {steps} steps",
                           f"Student − baseline at {long_steps} steps"], gaps)]
    rows = budget_rows(short)
    if rows:
        body = [[r["recipe"], f"{r['fraction']:g}", r["early"].text(), r["end"].text(), r["test"].text(),
                 f"{r['rise_base'].text()}: {verdict(r['rise_base'], 'still rising', 'falling')}",
                 f"{r['rise_ours'].text()}: {verdict(r['rise_ours'], 'still rising', 'falling')}"] for r in rows]
        at = f"steps {rows[0]['first']} / {rows[0]['last']}; change from step {rows[0]['back']}"
        lines += [f"## Fine-tune budget: student − baseline val accuracy early and at the end ({at})", "",
                  *_table(["Recipe", "Labels", "Val gap, first check", "Val gap, end", "Test gap (best-val ckpt)",
                           "Baseline, last ~100 steps", "Student, last ~100 steps"], body)]
    return lines


def _steps(tuned: pd.DataFrame) -> int | None:
    """The step budget of a set of fine-tunes (the most common one)."""
    return int(tuned["trainer.max_steps"].mode().iloc[0]) if len(tuned) else None


def severity_figure(rows: pd.DataFrame, keys: list[tuple], path: Path) -> Path | None:
    """Per family: student − baseline accuracy vs severity, one line per recipe (mean over seeds)."""
    tuned = rows[rows["stage"].eq("finetuned") & rows["grid"].eq("severity")]
    families = list(dict.fromkeys(tuned["distortion"]))
    if not families:
        return None
    fig, axes = panels(len(families), size=(4.6, 3.4))
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
    return save_figure(fig, path)


def bars_figure(values: dict[str, pd.Series], ref: float, xlabel: str, path: Path) -> Path | None:
    """Horizontal bars: mean ± std over seeds per recipe, a reference line at ``ref``."""
    values = {k: v.dropna() for k, v in values.items() if len(v.dropna())}
    if not values:
        return None
    fig, (ax,) = panels(1, size=(6.5, 0.35 * len(values) + 1.2))
    names = list(values)
    means = [v.mean() for v in values.values()]
    errs = [v.std(ddof=1) if len(v) > 1 else 0 for v in values.values()]
    ax.barh(range(len(names)), means, xerr=errs, color="tab:blue", alpha=0.7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(ref, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    return save_figure(fig, path)


def steps_figure(tuned: pd.DataFrame, keys: list[tuple], path: Path, budget: int | None = None) -> Path | None:
    """Val accuracy vs fine-tune steps (mean over seeds) of the recipe fine-tuned at every label
    fraction and its baseline (the convergence check's longer runs when there are; a dotted line at
    the study's ``budget``)."""
    fractions = tuned["data.label_fraction"].unique()
    key = next((k for k in keys if k[2] == MAIN_LOSS and all(
        len(_of(tuned[tuned["data.label_fraction"].eq(f)], k)) for f in fractions)), None)
    if key is None:
        return None
    c = curves(tuned, key[1], key[0])
    if c.empty:  # no run logged a validation curve
        return None
    fig, (ax,) = panels(1, size=(5.5, 3.6))
    for (method, fraction), part in c.groupby(["method", "fraction"]):
        mean = part.groupby("steps")["val"].mean() * 100
        ax.plot(mean.index, mean.to_numpy(), ls="-" if method == "ours" else "--",
                label=f"{'student' if method == 'ours' else 'supervised'}, {fraction:g} labels")
    if budget is not None and budget < c["steps"].max():
        ax.axvline(budget, color="grey", ls=":", lw=1, label=f"the study's budget ({budget} steps)")
    ax.set(title=label(key), xlabel="fine-tune steps", ylabel="val accuracy (%)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _setup(tuned: pd.DataFrame, rows: pd.DataFrame, root: Path, long: pd.DataFrame) -> list[str]:
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
            f"{ev['evaluation']['images']} corrupted test images (per-sample seeds)."
            + (f" Convergence check: {len(long)} fine-tunes of {_steps(long)} steps (test accuracy and "
               "curves only)." if len(long) else ""), ""]


def build(opts) -> str:
    """Writes ``results.md`` and the figures under ``opts.out`` from the run folders in
    ``opts.dirs``; returns the markdown."""
    root = opts.dirs[0]
    every, rows = load(root)
    finetuned = rows[rows["stage"].eq("finetuned")]
    main = float(finetuned["data.label_fraction"].mode().iloc[0])
    # The study's budget is that of the fine-tunes it evaluated; longer ones are the convergence
    # check, read for their test accuracy and curves only (never mixed into a recipe's numbers).
    budget = _steps(finetuned)
    tuned = every[every["trainer.max_steps"].eq(budget)]
    long = every[every["trainer.max_steps"].gt(budget)]
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
            steps_figure(long, st.keys, out / "steps.png", budget)
            or steps_figure(tuned, st.keys, out / "steps.png", budget)]
    lines = ["# Study: does the distilled student recover clean representations, or compensate for "
             "its one distortion?", "", *_setup(tuned, rows, root, long), *verdicts(st, n_seeds),
             *recipe_table(st), *recovery_table(st), *corruption_table(rows, st.keys, "cos_cls"),
             *corruption_table(rows, st.keys, "cka_cls"), *budget_section(tuned, long),
             "## Figures", "", *(f"![{p.stem}]({p.name})" for p in made if p is not None), ""]
    if bad := left_out(root):
        lines += ["## Left out", "", "Run folders without a finished result; no table uses them.", "", *bad, ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    return text
