"""Hydra entry points: ``distortkd-distill``, ``distortkd-finetune``, ``distortkd-evaluate``.

Each reads top to bottom: build data, model, callbacks, loggers, trainer; fit; test; write
``config.yaml`` and ``metrics.json`` next to the checkpoints; return the metric a sweeper optimises.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from distortkd import distortions
from distortkd.errors import UserError, unknown
from distortkd.losses import LOSSES
from distortkd.modules import (
    DistillModule,
    FinetuneModule,
    NonFiniteLossError,
    load_encoder_weights,
    run_checkpoint,
)
from distortkd.training import make_trainer, resumable, write_json, write_text
from distortkd.vit import build_encoder

CONF = str(Path(__file__).resolve().parent.parent / "conf")
# The supervised baseline starts from the pretrained weights; ours and CI from a distilled student.
OmegaConf.register_new_resolver(
    "init_for", lambda method: "pretrained" if method == "supervised" else "auto", replace=True
)


def _plain(node) -> dict:
    """A config node as a plain dict (None and empty nodes as {})."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def build_model(cfg: DictConfig, pretrained: bool | None = None):
    """The encoder a ``model/`` config describes.

    Weights: the hub (``pretrained``), a local timm ``weights_file`` (``.safetensors``/``.pth``), or a
    ``.ckpt`` of one of our runs (a distilled student or a fine-tuned backbone). ``pretrained=False``
    builds the architecture only (weights about to be loaded from elsewhere).
    """
    load = cfg.pretrained or cfg.weights_file is not None if pretrained is None else pretrained
    ckpt = load and cfg.weights_file is not None and str(cfg.weights_file).endswith(".ckpt")
    encoder = build_encoder(
        cfg.name,
        pretrained=bool(load and not ckpt),
        weights_file=cfg.weights_file if load and not ckpt else None,
        mean=tuple(cfg.mean) if cfg.get("mean") else None,
        std=tuple(cfg.std) if cfg.get("std") else None,
        keep_head=cfg.get("keep_head", False),
        **_plain(cfg.get("timm_kwargs")),
    )
    if ckpt:
        load_encoder_weights(encoder, cfg.weights_file)
    return encoder


def build_distortion(cfg: DictConfig) -> distortions.Distortion:
    return distortions.build(cfg.family, **_plain(cfg.params))


def build_loss(cfg: DictConfig):
    """``(loss_fn with parameters bound, contrastive?, needs attention taps?)``."""
    if cfg.fn not in LOSSES:
        raise unknown("loss function", cfg.fn, LOSSES)
    params = _plain(cfg.params)
    contrastive = cfg.fn == "contrastive"
    return partial(LOSSES[cfg.fn], **params), contrastive, not contrastive and params.get("gamma", 0) != 0


def resolve_init(cfg: DictConfig) -> str | None:
    """The student checkpoint a fine-tune starts from: explicit path, ``auto``, or None (pretrained)."""
    if cfg.init in (None, "pretrained"):
        return None
    if cfg.init != "auto":
        return str(cfg.init)
    run = Path(cfg.pretrain.run_dir)
    if (ckpt := run_checkpoint(run)) is not None:
        return str(ckpt)
    raise UserError(f"init=auto found no distilled student in {run}/checkpoints; run the distill "
                    "job first or pass init=/path/to/student.ckpt")


def run_distill(cfg: DictConfig, run_dir: Path) -> dict:
    datamodule = resumable(instantiate(cfg.data))
    student, teacher = build_model(cfg.model), build_model(cfg.model)
    teacher.load_state_dict(student.state_dict())  # identical start even for random-init models
    loss_fn, contrastive, with_attn = build_loss(cfg.loss)
    module = DistillModule(
        student, teacher, build_distortion(cfg.distortion), loss_fn,
        optimizer=instantiate(cfg.optim.optimizer), warmup=cfg.optim.warmup,
        eval_seed=cfg.seed, with_attn=with_attn, contrastive=contrastive, compile=cfg.model.compile,
    )
    trainer = make_trainer(cfg, run_dir, monitor="val/loss", mode="min")
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    return _metrics(trainer)


def run_finetune(cfg: DictConfig, run_dir: Path) -> dict:
    datamodule = resumable(instantiate(cfg.data))
    datamodule.prepare_data()
    datamodule.setup("fit")
    init = resolve_init(cfg)
    encoder = build_model(cfg.model, pretrained=None if init is None else False)
    if init is not None:
        load_encoder_weights(encoder, init)
    module = FinetuneModule(
        encoder, datamodule.num_classes, build_distortion(cfg.distortion),
        optimizer=instantiate(cfg.optim.optimizer), mode=cfg.finetune.mode,
        warmup=cfg.optim.warmup, eval_seed=cfg.seed,
        knn_k=cfg.finetune.knn_k, knn_temperature=cfg.finetune.knn_temperature,
    )
    trainer = make_trainer(cfg, run_dir, monitor="val/acc1", mode="max")
    if cfg.finetune.mode == "knn":  # nothing to train: score the frozen features on the test split
        trainer.test(module, datamodule=datamodule)
        return _metrics(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    metrics = _metrics(trainer)
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if cfg.finetune.test_ckpt == "best" else None)
    return {**metrics, **_metrics(trainer)}


def run_evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Accuracy (and representation diagnostics) of a fine-tuned checkpoint over a distortion grid."""
    from distortkd.evaluation import evaluate_grid

    return evaluate_grid(cfg, run_dir, build_model)


def _resume_path(cfg: DictConfig, run_dir: Path) -> str | None:
    """The newest of ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` that Lightning saves when
    Slurm signals a requeue (``hydra/launcher=slurm``); None with ``resume=false``."""
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
             if p.is_file()]
    if not cfg.get("resume", True) or not found:
        return None
    path = max(found, key=lambda p: p.stat().st_mtime)
    print(f"resuming from {path}", file=sys.stderr)
    return str(path)


def _metrics(trainer: L.Trainer) -> dict:
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_score is not None:
        out[f"best/{ckpt.monitor}"] = float(ckpt.best_model_score)
    return out


def _main(cfg: DictConfig, run) -> float:
    """Runs one job; in a multirun a failing job is recorded and the sweep goes on.

    Re-running a finished run (metrics.json status ok, same settings) returns its stored metrics
    without training again, and an unfinished one resumes from its last checkpoint, unless
    ``resume=false``. A run folder that holds a run with other settings is refused, not overwritten.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if bad := _empty_override(HydraConfig.get().overrides.task):
        return _refuse(bad, multirun=False)  # the whole command is wrong
    clash = _config_clash(cfg, run_dir)  # then that folder is another run's: nothing is written there
    try:
        build_distortion(cfg.distortion)  # cheap checks first: a bad value is named before a clash
        build_loss(cfg.loss)
        if clash:
            raise UserError(clash)
        if (done := _finished(cfg, run_dir)) is not None:
            return float(done.get(cfg.optimize_metric, math.nan))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        if _rank_zero():  # in this order: the other DDP ranks read config.yaml, then metrics.json
            (run_dir / "metrics.json").unlink(missing_ok=True)
            write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        metrics = run(cfg, run_dir)
        _write_metrics(run_dir, {**metrics, "status": "ok"})
        return float(metrics.get(cfg.optimize_metric, math.nan))
    except (UserError, NonFiniteLossError) as err:
        message = _with_checkpoint(str(err), run_dir) if isinstance(err, NonFiniteLossError) else str(err)
        if not clash:
            _record_failure(run_dir, message, message + "\n")
        return _refuse(message, multirun)
    except Exception as err:  # a crashed job must not take the rest of the sweep down
        _record_failure(run_dir, f"{type(err).__name__}: {err}", traceback.format_exc())
        if not multirun:
            raise
        print(f"job failed ({type(err).__name__}: {err}); traceback in {run_dir}/error.log", file=sys.stderr)
        return math.nan
    finally:
        _finish_wandb()


def _refuse(message: str, multirun: bool) -> float:
    """One line instead of a traceback; a multirun goes on with its next job."""
    if multirun:
        print(f"job failed: {message}", file=sys.stderr)
        return math.nan
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _rank_zero() -> bool:
    return L.fabric.utilities.rank_zero.rank_zero_only.rank == 0


def _empty_override(overrides) -> str | None:
    """``key=`` sets an empty string: almost always a shell variable that was not set."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and not value and not key.startswith("~"):
            key = key.lstrip("+")
            return (f"override {override!r} has an empty value; accepted: a value, {key}=null, "
                    f"or {key}=\"''\" for an empty string")
    return None


# Settings that change how a run executes, not what it computes: they may differ on a resume.
_EXECUTION_ONLY = ("resume", "paths.", "logger.", "checkpoint.", "data.num_workers", "data.pin_memory",
                   "data.cache_dir")


def _config_clash(cfg: DictConfig, run_dir: Path) -> str | None:
    """Why ``run_dir`` cannot be resumed or skipped: it holds a run whose stored ``config.yaml``
    differs from ``cfg`` (a sweep over a key the folder name leaves out would overwrite it).

    Keys only one side has are not compared (configs gain keys as the code grows).
    """
    stored = run_dir / "config.yaml"
    if not cfg.get("resume", True) or not stored.is_file():
        return None
    try:
        old = _flat(OmegaConf.to_container(OmegaConf.load(stored)))
    except Exception:  # an unreadable config.yaml holds nothing to protect
        return None
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and not k.startswith(_EXECUTION_ONLY))
    if not keys:
        return None
    return (f"{run_dir} holds a run with other settings ({keys[0]}: {old[keys[0]]!r} there, "
            f"{new[keys[0]]!r} now); accepted: the same settings, resume=false to start it over, "
            "or a run name that tells the runs apart")


def _finished(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The stored metrics of a finished run in ``run_dir`` (so it is skipped), else None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not cfg.get("resume", True) or not isinstance(metrics, dict) or metrics.get("status") != "ok":
        return None
    if _rank_zero():
        print(f"already finished: {run_dir} (metrics.json status ok); resume=false runs it again",
              file=sys.stderr)
    return metrics


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out = {}
    for key, sub in tree.items():
        out.update(_flat(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _with_checkpoint(message: str, run_dir: Path) -> str:
    """Appends where the last good (finite, never overwritten by a diverged model) state is."""
    from distortkd.checkpoints import load_checkpoint

    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"{message}; no checkpoint was written before"
    try:  # mmap: only global_step is needed, the tensors stay on disk
        step = load_checkpoint(last, mmap=True).get("global_step", "unknown")
    except UserError as err:  # appended, not raised: the run's own failure must still be recorded
        return f"{message}; no usable checkpoint: {err}"
    return f"{message}; last good checkpoint: {last} (global step {step})"


def _record_failure(run_dir: Path, error: str, log: str) -> None:
    """``metrics.json`` with status failed (the report lists the cell) and ``error.log``."""
    _write_metrics(run_dir, {"status": "failed", "error": error})
    if _rank_zero():
        write_text(run_dir / "error.log", log)


def _write_metrics(run_dir: Path, metrics: dict) -> None:
    if _rank_zero():
        write_json(run_dir / "metrics.json", metrics)


def _finish_wandb() -> None:
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # otherwise the next multirun job hangs on the open run


@hydra.main(config_path=CONF, config_name="distill", version_base="1.3")
def distill(cfg: DictConfig) -> float:
    return _main(cfg, run_distill)


@hydra.main(config_path=CONF, config_name="finetune", version_base="1.3")
def finetune(cfg: DictConfig) -> float:
    return _main(cfg, run_finetune)


@hydra.main(config_path=CONF, config_name="evaluate", version_base="1.3")
def evaluate(cfg: DictConfig) -> float:
    return _main(cfg, run_evaluate)


if __name__ == "__main__":
    {"distill": distill, "finetune": finetune, "evaluate": evaluate}[sys.argv.pop(1)]()
