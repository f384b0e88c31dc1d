"""Run folders read into pandas frames: one row per run, and one per evaluate row.

A run folder is any directory holding ``config.yaml`` (hidden folders such as Hydra's ``.hydra`` are
skipped). Its ``metrics.json`` holds scalar metrics and, for evaluate runs, ``suite`` and ``rows``;
a folder without it, or with ``"status": "failed"``, is a failed run: listed, and its cell missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from distortkd.errors import UserError

CONFIG_FIELDS = ("task", "experiment", "method", "seed", "model.name", "data.name",
                 "data.label_fraction", "distortion.name", "distortion.family", "loss.name",
                 "finetune.mode", "pretrain.distortion")
BASE_COLUMNS = (*CONFIG_FIELDS, "suite", "status", "error", "path")
ROW_METRICS = ("cos_cls", "cos_patch", "cka_cls", "attn_kl", "attn_iou")
# Family of a preset whose config lacks distortion.family, by the name's first word.
_PREFIX_FAMILY = {"mask": "mask", "noise": "gaussian_noise", "blur": "gaussian_blur",
                  "mixed": "mixed", "clean": "identity"}


def find_run_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    """Every folder holding ``config.yaml`` at any depth below ``dirs`` (hidden folders skipped)."""
    found = set()
    for root in map(Path, dirs):
        if not root.is_dir():
            raise UserError(f"run directory {str(root)!r} does not exist or is not a directory")
        for cfg in root.rglob("config.yaml"):
            if not any(p.startswith(".") for p in cfg.parent.relative_to(root).parts):
                found.add(cfg.parent.resolve())
    return sorted(found)


def _get(cfg: object, dotted: str) -> object:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg if cfg is None or isinstance(cfg, str | int | float | bool) else str(cfg)


def _read_metrics(run: Path) -> tuple[str, dict, str | None]:
    """(status, metrics, error) with status ``ok``, ``failed`` or ``missing`` (no metrics.json)."""
    if not (run / "metrics.json").is_file():
        return "missing", {}, "no metrics.json"
    try:
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError) as err:
        return "failed", {}, f"unreadable metrics.json: {err}"
    if not isinstance(metrics, dict):
        return "failed", {}, "metrics.json is not a JSON object"
    if metrics.get("status") == "failed":
        return "failed", metrics, str(metrics.get("error", "status: failed"))
    return "ok", metrics, None


def _load_run(run: Path) -> tuple[dict, list[dict]]:
    """One run's flat record and its evaluate rows, each row carrying the run's fields."""
    status, metrics, error = _read_metrics(run)
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))  # already resolved
    except Exception as err:  # a broken config must not stop the report; the run gets listed
        cfg, status, error = {}, "failed", "unreadable config.yaml: " + " ".join(str(err).split())
    rec = {key: _get(cfg, key) for key in CONFIG_FIELDS}
    if rec["distortion.family"] is None and isinstance(rec["distortion.name"], str):
        rec["distortion.family"] = _PREFIX_FAMILY.get(rec["distortion.name"].split("_")[0])
    if rec["loss.name"] is None and rec["method"] == "ours":
        rec["loss.name"] = "multilevel"
    if rec["finetune.mode"] is None and rec["task"] != "distill":
        rec["finetune.mode"] = "full"
    suite = metrics.get("suite")
    rec.update(suite=suite if isinstance(suite, str) else None, status=status, error=error)
    rec["path"] = str(run)
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in rec:
            rec[key] = float(value)
    raw = metrics.get("rows") if status == "ok" else None
    raw = raw if isinstance(raw, list) else []
    return rec, [{**rec, **r} for r in raw if isinstance(r, dict)]


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
    defaults to multilevel for ours, ``finetune.mode`` to full), ``suite``, ``status`` (ok,
    failed, missing), ``error``, ``path`` and every scalar metric (``test/acc1``, ...)."""
    return scan(dirs)[0]


def load_rows(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per entry of ``rows`` in finished runs (``distortion``, ``severity``, ``acc1``,
    diagnostics), with the run's columns as in :func:`load_runs`."""
    return scan(dirs)[1]
