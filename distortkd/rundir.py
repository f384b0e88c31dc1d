"""The run folder as a contract: what its files mean, shared by the CLIs, later stages and the report.

A run folder ``runs/<experiment>/<task>/<run name>/`` holds:

- ``config.yaml``: the resolved config the run was started with (plus ``provenance``: which
  upstream checkpoint it used);
- ``metrics.json``: standard JSON (never NaN/inf) with ``status`` and, for ``ok``, every metric the
  run promises, each finite; a copy of the resolved config under ``config`` so that the run can be
  rebuilt and reported even if ``config.yaml`` is lost;
- ``checkpoints/{best,last}.ckpt``, ``csv/metrics.csv``, and ``error.log`` for a failed run.

``status``: ``ok`` (finished: every promised metric stored and finite), ``failed`` (with ``error``),
``stopped`` (a signal ended it; re-running the command resumes it). A folder with no metrics.json
holds an unfinished run (running, or killed).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from omegaconf import OmegaConf

STATUSES = ("ok", "failed", "stopped")

# Settings that change how a run executes, not what it computes: they may differ on a resume and
# between the seeds of one table cell.
EXECUTION_ONLY = ("resume", "paths.", "logger.", "checkpoint.", "data.num_workers", "data.pin_memory",
                  "data.cache_dir", "threads", "callbacks.", "provenance.", "allow_unfinished",
                  "trust_checkpoint")
# Names and paths derived from other settings (they carry the seed): never compared.
DERIVED = ("run_name", "names.", "pretrain.run_dir", "finetune_run", "optimize_metric")


def flat(tree, prefix: str = "") -> dict:
    """A nested dict as ``{"a.b.c": leaf}`` (an empty dict or list is a leaf)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, sub in tree.items():
        out.update(flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def compared(config: dict, *, seed: bool = True) -> dict:
    """The flat settings that define what a run computes (``seed`` dropped with ``seed=False``)."""
    return {k: v for k, v in flat(config).items()
            if not k.startswith(EXECUTION_ONLY + DERIVED) and (seed or k != "seed")}


def differences(old: dict, new: dict) -> list[str]:
    """Compared keys whose values differ (keys only one side has are not compared: configs gain
    keys as the code grows)."""
    a, b = compared(old), compared(new)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def finite_json(obj):
    """``obj`` with every non-finite float replaced by None (standard JSON), and the dotted keys
    of those floats."""
    bad: list[str] = []

    def walk(x, path: str):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(path)
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, ""), bad


def read_metrics(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """``(metrics, None)``, or ``(None, why)`` when metrics.json is absent, unreadable or not an object."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None, "no metrics.json (unfinished: running, killed, or never started)"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable metrics.json: {' '.join(str(err).split())}"
    if not isinstance(metrics, dict):
        return None, "metrics.json is not a JSON object"
    return metrics, None


def read_config(run_dir: str | Path) -> tuple[dict | None, str | None]:
    """The run's resolved config: ``config.yaml``, else the copy in ``metrics.json``.

    Returns ``(config, None)`` or ``(None, why)``.
    """
    path = Path(run_dir) / "config.yaml"
    why = "no config.yaml"
    if path.is_file():
        try:  # OmegaConf reads back exactly what OmegaConf.to_yaml wrote (floats like 5e-05)
            config = OmegaConf.to_container(OmegaConf.load(path))
            if isinstance(config, dict):
                return config, None
            why = "config.yaml is not a mapping"
        except Exception as err:  # noqa: BLE001 - any parse error means the same: unreadable
            why = f"unreadable config.yaml: {' '.join(str(err).split())[:200]}"
    metrics, _ = read_metrics(run_dir)
    if metrics is not None and isinstance(metrics.get("config"), dict):
        return metrics["config"], None
    return None, why


def holds_results(run_dir: str | Path) -> bool:
    """Whether the folder holds anything a rerun could destroy: checkpoints or a finished result."""
    run_dir = Path(run_dir)
    if any((run_dir / "checkpoints").glob("*.ckpt")) or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return True
    metrics, _ = read_metrics(run_dir)
    return metrics is not None and metrics.get("status") == "ok"


def setting(config: dict) -> dict:
    """What a run computes apart from its seed: the settings that decide which runs may pool.

    :func:`compared` without ``seed``, and also without what the seed leaks into: ``*.seed``
    copies of it (``data.seed: ${seed}``) and run names in paths (``…_s3/checkpoints``). Paths
    under the run root are written relative to it, so two run roots can hold the same setting.
    """
    seed, root = config.get("seed"), (config.get("paths") or {}).get("root")
    seed_name = re.compile(rf"_s{re.escape(str(seed))}(?=[/_.]|$)")
    out = {}
    for key, value in compared(config, seed=False).items():
        if key.endswith(".seed") and value == seed:
            continue
        if isinstance(value, str):
            value = value.replace(root, "<runs>") if isinstance(root, str) and root else value
            value = seed_name.sub("_s<seed>", value)
        out[key] = value
    return out
