"""Trainer assembly: checkpoints, loggers, progress output, atomic result files."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf


def write_json(path: Path, obj: dict) -> None:
    """Writes JSON atomically (temp file in the same folder, then rename): never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


class EpochLine(Callback):
    """One plain line per epoch (CI logs, non-interactive terminals): metrics and time."""

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        keep = [k for k in sorted(trainer.callback_metrics) if "/" in k and "step" not in k]
        parts = [f"{k}={float(trainer.callback_metrics[k]):.4f}" for k in keep[:10]]
        took = time.perf_counter() - getattr(self, "_start", time.perf_counter())
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {' '.join(parts)} ({took:.1f}s)",
              flush=True)


def _interactive() -> bool:
    return sys.stdout.isatty() and not os.environ.get("CI")


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """CSV always (the report reads run folders, not W&B); W&B when ``logger=wandb``."""
    if cfg.logger.get("kind") == "none":
        return []
    loggers = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if cfg.logger.get("kind") == "wandb":
        from distortkd.wandb_utils import make_wandb_logger

        loggers.append(make_wandb_logger(cfg, run_dir))
    return loggers


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str) -> L.Trainer:
    """The configured Trainer with checkpointing into ``run_dir/checkpoints`` (stable per run)."""
    ck = cfg.checkpoint
    callbacks = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"), filename="best", monitor=monitor, mode=mode,
            save_last=True, save_top_k=1, every_n_train_steps=ck.every_n_train_steps,
            auto_insert_metric_name=False,
        ),
        RichProgressBar() if _interactive() else EpochLine(),
    ]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    return instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=make_loggers(cfg, run_dir) or False,
        default_root_dir=str(run_dir),
        enable_progress_bar=_interactive(),
    )
