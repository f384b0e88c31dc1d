"""Run folders read into pandas frames: one row per run, and one per evaluate row.

A run folder is any directory holding ``config.yaml``, ``metrics.json`` or ``checkpoints/*.ckpt``
(hidden folders such as Hydra's ``.hydra``, and the ``checkpoints/`` and ``csv/`` sub-folders
themselves, are skipped), so a run whose config.yaml was deleted is still found. Files are read
through :mod:`distortkd.rundir`: the config falls back to the copy in ``metrics.json``.

``status``: ``ok`` (``metrics.json`` says ok, or, written before statuses existed, says nothing),
``failed`` / ``stopped`` (with ``error``), ``missing`` (no metrics.json: unfinished), ``stale``
(finished, but a checkpoint it was built on holds other bytes now: ``rundir.stale``), and
``failed`` for a folder whose config cannot be read at all. Only ``ok`` runs give values.
A metric stored as null, NaN or ±inf becomes NaN in the frame and is named in ``bad`` (key →
``"null"``, ``"nan"``, ``"inf"``), so that a table can say why the run gave it no value. So does
a value of an evaluate row; the run's ``bad_rows`` lists those (distortion, severity, which value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from distortkd import rundir
from distortkd.errors import UserError

CONFIG_FIELDS = ("task", "experiment", "method", "seed", "model.name", "data.name",
                 "data.label_fraction", "distortion.name", "distortion.family", "loss.name",
                 "finetune.mode", "pretrain.distortion", "pretrain.data")
# setting: rundir.setting as sorted JSON (runs with equal settings may pool); bad, bad_rows: above.
BASE_COLUMNS = (*CONFIG_FIELDS, "suite", "status", "error", "path", "setting", "bad", "bad_rows")
ROW_METRICS = ("cos_cls", "cos_patch", "cka_cls", "attn_kl", "attn_iou")
_NOT_RUNS = ("checkpoints", "csv")  # parts of a run folder, never runs themselves


def _is_run(folder: Path) -> bool:
    return ((folder / "config.yaml").is_file() or (folder / "metrics.json").is_file()
            or any((folder / "checkpoints").glob("*.ckpt")))


def find_run_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """Every run folder at any depth below ``dirs`` (see the module docstring)."""
    found = set()
    for root in map(Path, dirs):
        if not root.is_dir():
            raise UserError(f"run directory {str(root)!r} does not exist or is not a directory")
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            parts = folder.relative_to(root).parts
            if any(p.startswith(".") or p in _NOT_RUNS for p in parts):
                continue
            if _is_run(folder):
                found.add(folder.resolve())
    return sorted(found)


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg if cfg is None or isinstance(cfg, str | int | float | bool) else str(cfg)


def _flatten(cfg: object, prefix: str = "") -> dict:
    """Every leaf of a run's config as a dotted column (lists as JSON text, so that a table can
    group on them): a table may filter or pivot on any setting a run recorded, not only on
    ``CONFIG_FIELDS`` (the columns every frame has, with their defaults for old runs)."""
    if isinstance(cfg, dict):
        out = {}
        for key, value in cfg.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    value = cfg if cfg is None or isinstance(cfg, str | int | float | bool) else json.dumps(cfg, default=str)
    return {prefix[:-1]: value} if prefix else {}


def _status(run: Path) -> tuple[str, dict, str | None]:
    """(status, metrics, error) of a run folder, from its metrics.json."""
    metrics, why = rundir.read_metrics(run)
    if metrics is None:
        return ("missing" if not (run / "metrics.json").is_file() else "failed"), {}, why
    status = metrics.get("status", "ok")  # runs written before statuses existed finished ok
    if status == "ok":
        return "ok", metrics, None
    status = status if status in rundir.STATUSES else "failed"
    return status, metrics, str(metrics.get("error") or f"status: {metrics.get('status')}")


def _numbers(metrics: dict) -> tuple[dict, dict]:
    """Scalar metrics as floats (non-finite and null → NaN), and ``{key: why}`` for those."""
    values, bad = {}, {}
    for key, value in metrics.items():
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            number = math.nan if value is None else float(value)
            if not math.isfinite(number):
                bad[key] = "null" if value is None else str(number)
                number = math.nan
            values[key] = number
    return values, bad


def _finite_rows(raw: object) -> tuple[list[dict], list[str]]:
    """Evaluate rows with every null or non-finite number made NaN (it must never reach a mean),
    and one line per such value: which row (distortion / severity) and which value."""
    rows = [r for r in raw if isinstance(r, dict)] if isinstance(raw, list) else []
    out, bad = [], []
    for row in rows:
        values, why = _numbers(row)
        out.append({**row, **values})
        where = f"evaluate row {row.get('distortion')} / {row.get('severity')}"
        bad += [f"{where}: `{key}` is {shown}" for key, shown in why.items()]
    return out, bad


def _family_of(preset: str) -> str | None:
    """The family of a preset named in a config that predates ``distortion.family``, by the
    name's first word (``noise_strong`` -> gaussian_noise), from the families' records (imported
    here: they live with the distortions, which import torch)."""
    from distortkd import distortions

    prefixes = {record.prefix: name for name, record in distortions.families().items() if record.prefix}
    return prefixes.get(preset.split("_")[0])


def _load_run(run: Path) -> tuple[dict, list[dict]]:
    """One run's flat record and its evaluate rows, each row carrying the run's fields."""
    status, metrics, error = _status(run)
    cfg, why = rundir.read_config(run)
    if cfg is None:  # nothing says what it computed: it can fill no cell
        cfg, status = {}, "failed"
        error = f"config.yaml missing/unreadable ({why})" + (f"; {error}" if error else "")
    if status == "ok" and (why := rundir.stale(cfg, run)) is not None:
        status, error = "stale", why  # its numbers belong to a checkpoint that no longer exists
    rec = {key: _get(cfg, key) for key in CONFIG_FIELDS}
    rec.update({k: v for k, v in _flatten(cfg).items() if k not in rec})
    if rec["distortion.family"] is None and isinstance(rec["distortion.name"], str):
        rec["distortion.family"] = _family_of(rec["distortion.name"])
    if rec["loss.name"] is None and rec["method"] == "ours":
        rec["loss.name"] = "multilevel"
    if rec["finetune.mode"] is None and rec["task"] != "distill":
        rec["finetune.mode"] = "full"
    suite = metrics.get("suite")
    rec.update(suite=suite if isinstance(suite, str) else None, status=status, error=error)
    rec["path"] = str(run)
    rec["setting"] = json.dumps(rundir.setting(cfg), sort_keys=True, default=str) if cfg else None
    values, bad = _numbers(metrics)
    rec["bad"] = bad or None
    rec.update({k: v for k, v in values.items() if k not in rec})
    rows, bad_rows = _finite_rows(metrics.get("rows")) if status == "ok" else ([], [])
    rec["bad_rows"] = bad_rows or None
    return rec, [{**rec, **r} for r in rows]


def _frame(records: list[dict], first: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records)
    return df.reindex(columns=[*first, *(c for c in df.columns if c not in first)])


def scan(dirs: Iterable[str | Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(load_runs(dirs), load_rows(dirs))`` from one pass over the files."""
    runs, rows = [], []
    for run in find_run_dirs(dirs):
        rec, run_rows = _load_run(run)
        runs.append(rec)
        rows.extend(run_rows)
    row_first = (*BASE_COLUMNS, "distortion", "severity", "acc1", *ROW_METRICS)
    return _frame(runs, BASE_COLUMNS), _frame(rows, row_first)


def load_runs(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run folder: ``CONFIG_FIELDS`` as dotted columns (missing → None; ``loss.name``
    defaults to multilevel for ours, ``finetune.mode`` to full), every other leaf of the run's
    config as a dotted column too (``optim.optimizer.lr``, ``teacher.name``, ...), ``suite``, ``status`` (ok,
    failed, stopped, missing), ``error``, ``path``, ``setting``, ``bad`` and every scalar metric
    (``test/acc1``, ...; non-finite → NaN)."""
    return scan(dirs)[0]


def load_rows(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per entry of ``rows`` in finished runs (``distortion``, ``severity``, ``acc1``,
    diagnostics), with the run's columns as in :func:`load_runs`."""
    return scan(dirs)[1]
