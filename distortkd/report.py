"""``distortkd-report``: the paper's tables and figures rebuilt from run folders alone (no W&B
needed; ``--wandb PROJECT`` also logs them to one W&B run).

Run folders are read by :mod:`distortkd.runs`. A cell is the mean ± sample std (ddof=1) over
seeds of runs whose settings are identical but for the seed; a seed that ran twice with identical
settings is averaged first. Runs that land in the same cell with different settings are never
pooled: each setting gets its own row, tagged with the keys that tell them apart
(``noise_strong [distortion.params.sigma=0.05]``, see :mod:`distortkd.tables`); the held-out
tables tag the model column instead, and the figures their curves, by the same rule
(:mod:`distortkd.selection`). ``n`` (the seed count in the footnote) counts pooled runs only. A
model's mCE is relative to the supervised runs of its setting but method/init, pooled over seeds.

Nothing is dropped silently: every run that gives a table no value — failed, stopped, unfinished,
a config that cannot be read, a metric that is missing, null, NaN or inf, no single mCE baseline —
and every null/NaN/inf value of an evaluate row is listed under "Left out" with the reason, and
its cell stays in the missing-cell list. Tables are built from
whatever datasets their runs used (one table per dataset for tables 1 and 3); the filters that
remain are each table's definition (e.g. all labels, strong presets), named when it is skipped.
Filter options that match no run, and unknown metrics, are errors (exit 2), never an empty report.

This module is the command line and the document; the tables and figures are defined in
:mod:`distortkd.paper`, run selection and grouping in :mod:`distortkd.selection`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from distortkd import wandb_utils
from distortkd.errors import UserError, unknown
from distortkd.paper import ALIASES, FIGURES, LAYOUTS, SCOPES, TABLES, make_figure
from distortkd.runs import BASE_COLUMNS, scan
from distortkd.selection import scope
from distortkd.tables import Table, to_latex, to_markdown


def _left_out(runs: pd.DataFrame, tables: dict[str, list[Table]]) -> list[str]:
    """One line per run folder that gives some table no value: path, reason(s), tables; and the
    evaluate rows whose non-finite values were kept out of every mean (no table named: all are)."""
    why: dict[str, dict[str, list[str]]] = {}
    for r in runs[runs["status"].ne("ok")].itertuples():
        why.setdefault(r.path, {}).setdefault(f"{r.status}: {r.error}", [])
    for path, bad in zip(runs["path"], runs["bad_rows"], strict=True):
        for reason in bad if isinstance(bad, list) else []:
            why.setdefault(path, {}).setdefault(reason, [])
    for name, made in tables.items():
        for path, reason in (x for t in made for x in t.left_out):
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
             f"{n.get('missing', 0)} without metrics.json"
             + (f", {n['stale']} stale (built on a checkpoint that has changed since)" if n.get("stale") else "")
             + ".", "", *sections]
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
    if scope(runs, opts).empty:
        raise UserError(f"no run matches --experiment {opts.experiment!r} --data {opts.data!r} "
                        "together")


def build(opts) -> str:
    """Writes ``tables/<name>.tex``, the figures and ``results.md`` under ``opts.out``.

    Returns:
        The markdown of ``results.md``.
    """
    return make(opts)[0]


def make(opts) -> tuple[str, list[Table], list[Path]]:
    """As :func:`build`; returns the markdown, the tables and the figure files it wrote."""
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
    return text, [t for tables in done.values() for t in tables], made


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse adds a usage block; the house rule is one line
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distortkd-report", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="folders searched for run folders")
    p.add_argument("--out", type=Path, default=Path("report"), help="output folder (./report)")
    p.add_argument("--layout", choices=sorted([*LAYOUTS, "study"]), default="paper",
                   help="study: the verdicts of `make study` (distortkd.report_study)")
    p.add_argument("--only", help=f"comma-separated: {', '.join([*TABLES, *FIGURES, *ALIASES])}")
    p.add_argument("--metric", help="a metric the runs hold (default test/acc1, falling back "
                   "to val/acc1)")
    p.add_argument("--experiment", help="only this experiment's runs (drops default data filters)")
    p.add_argument("--data", help="only runs on this dataset")
    p.add_argument("--wandb", metavar="PROJECT", help="also log every table and figure to one W&B run "
                   "of PROJECT, named after --out (offline without credentials)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``distortkd-report``; returns the exit status (2 for a user error)."""
    opts = _parser().parse_args(argv)
    try:
        if opts.wandb is not None:
            wandb_utils.check_project(opts.wandb)
        if opts.layout == "study":  # its own document: verdicts from paired tests, not paper tables
            from distortkd import report_study

            text, tables, figures = report_study.build(opts), [], []
        else:
            text, tables, figures = make(opts)
        if opts.wandb is not None:
            wandb_utils.push_report(opts.wandb, opts.out, opts.dirs, tables, figures, group=opts.experiment)
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
