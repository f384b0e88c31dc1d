"""Trainer assembly: checkpoints, resumable data, loggers, progress output."""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import Container, DictConfig, OmegaConf
from torch.utils.data import DataLoader

from distortkd.callbacks import AttentionPanels
from distortkd.errors import UserError
from distortkd.rundir import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temp file in the checkpoint's own folder, fsync, then ``os.replace``.

    Lightning's ``_atomic_save`` goes through an fsspec transaction, which for a local path writes
    ``tempfile.mkstemp()`` in the *system* temp folder and then ``shutil.move``s it: a rename only
    when /tmp and the run folder share a filesystem. On a cluster (node-local /tmp, runs on NFS or
    Lustre) the move copies into ``last.ckpt`` in place, so a kill mid-copy leaves a truncated
    checkpoint, and every killed save leaves a checkpoint-sized file in /tmp.

    OmegaConf containers (the datamodule's hyper-parameters) are written as plain lists and dicts,
    so that ``torch.load``'s default ``weights_only=True`` (and so Lightning's resume) can read them.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        checkpoint = _plain(checkpoint)
        if "://" in str(path):  # remote storage: fsspec's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f), binary=True)


def _plain(obj):
    if isinstance(obj, Container):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _rng_state() -> dict:
    """torch's generators, the only ones training draws from (crops, flips, distortions)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumableLoader(DataLoader):
    """A DataLoader that can continue an epoch after its first ``served`` batches, bit for bit.

    Nothing is drawn before the first batch is asked for, so the epoch's randomness starts from
    ``start_rng`` whatever Lightning does between ``iter()`` and ``next()``. ``resume`` (set by
    ``ResumeState``) replays the epoch's start: same generators, hence the same shuffle and worker
    seeds; the batches already trained on are loaded again and dropped (their data only, no step),
    then the generators are set to where the checkpoint left them.
    """

    start_rng: dict | None = None
    served: int = 0
    resume: dict | None = None

    @classmethod
    def like(cls, loader: DataLoader) -> ResumableLoader:
        """The same loader (dataset, batch size, shuffling, workers), resumable.

        Workers are not persistent: a persistent worker carries its generator from epoch to epoch,
        which no checkpoint holds; fresh workers are seeded from the main generator at each epoch's
        first batch (a second or so per epoch), and that ``ResumeState`` restores.
        """
        return cls(loader.dataset, loader.batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                   collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                   generator=loader.generator, prefetch_factor=loader.prefetch_factor)

    def __iter__(self):
        return self._batches()

    def state_dict(self) -> dict:
        # Marks the loader resumable for Lightning (no "not resumable" warning); see ResumeState.
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        pass  # ResumeState restores the position: Lightning 2.6 never calls this for it

    def _batches(self):
        resume, self.resume = self.resume, None
        if resume:
            _set_rng_state(resume["start_rng"])
        self.start_rng, self.served = _rng_state(), 0
        batches = super().__iter__()
        if resume:
            for _ in range(resume["served"]):
                next(batches)
            self.served = resume["served"]
            _set_rng_state(resume["rng"])
        for batch in batches:
            self.served += 1
            yield batch


def resumable(datamodule: L.LightningDataModule) -> L.LightningDataModule:
    """Serves ``datamodule``'s train split through a ``ResumableLoader``."""
    plain = datamodule.train_dataloader
    datamodule.train_dataloader = lambda: ResumableLoader.like(plain())
    return datamodule


class ResumeState(Callback):
    """Saves torch's generators and the position in the epoch with every checkpoint; restores both.

    Lightning 2.6 saves neither. A mid-epoch resume restarts a plain DataLoader at its first batch
    and only ends the epoch early: the batches before the checkpoint are seen twice, those after it
    never. Its own support for loaders with ``state_dict`` does not help here: ``configure_optimizers``
    reads ``estimated_stepping_batches``, which builds the loader before the loop state that would
    restore it is loaded, so ``load_state_dict`` is never called.
    """

    def __init__(self):
        self._loaded: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        loader = trainer.train_dataloader
        checkpoint["resume_state"] = {
            "rng": _rng_state(), "epoch": trainer.current_epoch,
            "start_rng": getattr(loader, "start_rng", None), "served": getattr(loader, "served", 0),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._loaded = checkpoint.get("resume_state")
        if self._loaded:
            _set_rng_state(self._loaded["rng"])  # an end-of-epoch checkpoint needs nothing more
        if writer := _csv_writer(trainer):
            writer.resume_step = checkpoint["global_step"]

    def on_train_start(self, trainer, pl_module) -> None:
        # Not on_train_epoch_start: Lightning does not call it for an epoch it restarts mid-way.
        state, self._loaded = self._loaded, None
        loader = trainer.train_dataloader
        mid_epoch = (state and state["start_rng"] is not None and state["epoch"] == trainer.current_epoch
                     and state["served"] < trainer.num_training_batches)
        if mid_epoch and isinstance(loader, ResumableLoader):
            loader.resume = state


class LastValidation(Callback):
    """Remembers the global step of the last validation that ran in this process (None: none)."""

    step: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def last_validated_step(trainer: L.Trainer) -> int | None:
    return next((cb.step for cb in trainer.callbacks if isinstance(cb, LastValidation)), None)


class CheckpointOnSigterm(Callback):
    """Saves ``last.ckpt`` when SIGTERM (a scheduler, ``timeout``, ``kill``) stops training.

    Lightning raises ``SIGTERMException`` only between steps (after the optimizer step and the
    logging of a batch), so the state is whole and the resume exact; it saves nothing itself.
    Not on Ctrl+C: a KeyboardInterrupt can land inside an optimizer step, and a half-updated model
    must never replace the last good checkpoint.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.training:
            trainer.save_checkpoint(self.path)


def checkpoint_callbacks(run_dir: Path, monitor: str, mode: str, every_n_train_steps: int | None) -> list:
    """``best.ckpt`` (by ``monitor``, after validation); ``last.ckpt`` after every epoch and, with
    ``every_n_train_steps``, every that many optimizer steps (mid-epoch too).

    Not ``save_last=True``: Lightning 2.6 refreshes ``last.ckpt`` only at steps where it also saved
    a top-k checkpoint, so an epoch that did not improve ``monitor`` left a stale ``last.ckpt``, and
    step-interval saves waited for the first validation. Both ``last`` callbacks write one file;
    no version counter, so ``resume=false`` overwrites instead of leaving a stale ``best.ckpt``.
    """
    folder = str(run_dir / "checkpoints")
    last = dict(dirpath=folder, filename="last", save_top_k=1, enable_version_counter=False)
    callbacks = [
        ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                        auto_insert_metric_name=False, enable_version_counter=False),
        ModelCheckpoint(**last),
    ]
    if every_n_train_steps:
        callbacks.append(ModelCheckpoint(**last, every_n_train_steps=every_n_train_steps))
    return callbacks


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


class _ResumableCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, except that a resumed run keeps the rows logged before its checkpoint.

    Lightning's deletes an existing ``metrics.csv`` when created, so a resumed run lost every row
    logged before the kill. This one keeps the rows with ``step < resume_step`` (the checkpoint's
    global step, set by ``ResumeState``; None on a fresh start keeps nothing). Lightning logs batch
    ``b`` at step ``b`` and an epoch's validation at its last batch's step; a checkpoint saved at
    that last batch is followed by validation rows that the resumed run logs again, so a new row
    replaces a kept one with the same step and the same metric names.
    """

    def __init__(self, log_dir: str):
        self.resume_step: int | None = None
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by __init__, where Lightning's deletes the file
        self._previous = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self._previous = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]

    def save(self) -> None:
        if self.metrics and self._previous is not None:  # the first rows of this process
            new = {_row_id(row) for row in self.metrics}
            kept = [row for row in self._previous if self.resume_step is not None
                    and int(row["step"]) < self.resume_step and _row_id(row) not in new]
            self.metrics, self._previous = kept + self.metrics, None
            if self._fs.isfile(self.metrics_file_path):
                self._fs.rm_file(self.metrics_file_path)
        super().save()


def _row_id(row: dict) -> tuple:
    return int(row["step"]), frozenset(k for k in row if k not in ("step", "epoch"))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume (see ``_ResumableCSVWriter``)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableCSVWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableCSVWriter(log_dir=self.log_dir)
        return self._experiment


def _csv_writer(trainer: L.Trainer) -> _ResumableCSVWriter | None:
    if not trainer.is_global_zero:
        return None
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, ResumableCSVLogger)), None)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """CSV always (the report reads run folders, not W&B); W&B when ``logger=wandb``."""
    if cfg.logger.get("kind") == "none":
        return []
    loggers = [ResumableCSVLogger(save_dir=str(run_dir), name="csv", version="")]
    if cfg.logger.get("kind") == "wandb":
        from distortkd.wandb_utils import make_wandb_logger

        loggers.append(make_wandb_logger(cfg, run_dir))
    return loggers


def check_launch(trainer: L.Trainer, multirun: bool) -> None:
    """Refuses Lightning's own multi-process launch inside a Hydra multirun.

    That launcher starts each extra process by re-running ``sys.argv`` (``-m`` and every sweep value
    included), so each process would run the whole sweep (Lightning issue 11300). Processes started
    by Slurm or torchrun are fine: Lightning then launches nothing.
    """
    launcher = trainer.strategy.launcher
    if (multirun and isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):
        raise UserError(
            f"{type(trainer.strategy).__name__} with {launcher.num_processes} devices cannot be "
            "launched by Lightning inside a multirun (-m): every process would re-run the whole sweep; "
            "accepted: hydra/launcher=slurm (one task per device), torchrun, or one run per command "
            "without -m")


def make_trainer(cfg: DictConfig, run_dir: Path, monitor: str, mode: str) -> L.Trainer:
    """The configured Trainer with checkpointing into ``run_dir/checkpoints`` (stable per run)."""
    callbacks = [
        *checkpoint_callbacks(run_dir, monitor, mode, cfg.checkpoint.every_n_train_steps),
        ResumeState(),
        LastValidation(),
        CheckpointOnSigterm(run_dir / "checkpoints" / "last.ckpt"),
        RichProgressBar() if _interactive() else EpochLine(),
        AttentionPanels(run_dir, cfg.logger.get("attention_every_n_epochs", 5)),
        *(instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None),
    ]
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer = instantiate(
        trainer_cfg,
        callbacks=callbacks,
        logger=make_loggers(cfg, run_dir) or False,
        default_root_dir=str(run_dir),
        enable_progress_bar=_interactive(),
        plugins=[AtomicCheckpointIO()],
    )
    check_launch(trainer, HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)
    if trainer.is_global_zero:  # temp files of saves that were killed mid-write
        for tmp in (run_dir / "checkpoints").glob(".*.ckpt.*.tmp"):
            tmp.unlink(missing_ok=True)
    return trainer
