"""Hydra entry points: ``distortkd-distill``, ``distortkd-finetune``, ``distortkd-evaluate``.

Each reads top to bottom: build data, model, callbacks, loggers, trainer; fit; test; write
``config.yaml`` and ``metrics.json`` next to the checkpoints; return the metric a sweeper optimises.
"""

from __future__ import annotations

import math
import sys
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from distortkd import CONF, rundir
from distortkd.build import (
    build_distortion,
    build_loss,
    build_model,
    build_teacher,
    check_teacher,
    provenance,
    schedule,
)
from distortkd.checkpoints import load_checkpoint
from distortkd.checks import check_config
from distortkd.errors import UserError
from distortkd.modules import (
    DistillModule,
    FinetuneModule,
    NonFiniteLossError,
    load_encoder_weights,
)
from distortkd.training import last_validated_step, make_trainer, resumable

# The supervised baseline starts from the pretrained weights; ours and CI from a distilled student.
OmegaConf.register_new_resolver(
    "init_for", lambda method: "pretrained" if method == "supervised" else "auto", replace=True
)


def run_distill(cfg: DictConfig, run_dir: Path) -> dict:
    datamodule = resumable(instantiate(cfg.data))
    # model= is the student; teacher= the frozen teacher (teacher=same: the paper's setting).
    student = build_model(cfg.model, trust=cfg.trust_checkpoint)
    teacher = build_teacher(cfg.get("teacher"), cfg.model, student, trust=cfg.trust_checkpoint)
    check_teacher(student, teacher, cfg.loss, (cfg.get("teacher") or {}).get("name") or cfg.model.name)
    module = DistillModule(
        student, teacher, build_distortion(cfg.distortion), build_loss(cfg.loss),
        optimizer=instantiate(cfg.optim.optimizer), warmup=cfg.optim.warmup,
        eval_seed=cfg.seed, compile=cfg.model.compile,
        **schedule(cfg.optim),
    )
    trainer = make_trainer(cfg, run_dir, monitor="val/loss", mode="min")
    return _fit(trainer, module, datamodule, cfg, run_dir)


def run_finetune(cfg: DictConfig, run_dir: Path) -> dict:
    datamodule = resumable(instantiate(cfg.data))
    datamodule.prepare_data()
    datamodule.setup("fit")
    init = provenance(cfg).get("init", {}).get("path")
    encoder = build_model(cfg.model, pretrained=None if init is None else False, trust=cfg.trust_checkpoint)
    if init is not None:
        load_encoder_weights(encoder, init, trust=cfg.trust_checkpoint)
    module = FinetuneModule(
        encoder, datamodule.num_classes, build_distortion(cfg.distortion),
        optimizer=instantiate(cfg.optim.optimizer), mode=cfg.finetune.mode,
        warmup=cfg.optim.warmup, eval_seed=cfg.seed,
        knn_k=cfg.finetune.knn_k, knn_temperature=cfg.finetune.knn_temperature, **schedule(cfg.optim),
    )
    trainer = make_trainer(cfg, run_dir, monitor="val/acc1", mode="max")
    if cfg.finetune.mode == "knn":  # nothing to train: score the frozen features on the test split
        trainer.test(module, datamodule=datamodule)
        return _metrics(trainer)
    metrics = _fit(trainer, module, datamodule, cfg, run_dir)
    trainer.test(module, datamodule=datamodule, ckpt_path="best" if cfg.finetune.test_ckpt == "best" else None)
    # Which weights test/acc1 is of: the selected checkpoint's file, or the final weights.
    tested = trainer.ckpt_path or f"final weights (global step {trainer.global_step})"
    return {**metrics, **_metrics(trainer), "test_checkpoint": str(tested)}


def run_evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Accuracy (and representation diagnostics) of a fine-tuned checkpoint over a distortion grid."""
    from distortkd.evaluation import evaluate_grid

    return evaluate_grid(cfg, run_dir, build_model, Path(provenance(cfg)["checkpoint"]["path"]))


def _fit(trainer: L.Trainer, module, datamodule, cfg: DictConfig, run_dir: Path) -> dict:
    """Trains (or resumes), then makes sure the metrics describe the final weights.

    A run resumed from a checkpoint saved after its last step trains nothing and validates nothing;
    nor does one whose last validation came before its last step. Either is validated again here,
    so a recovered run stores every metric a fresh one does, never a partial set.
    """
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, run_dir))
    if last_validated_step(trainer) != trainer.global_step:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    return _metrics(trainer)


def promised(cfg: DictConfig) -> list[str]:
    """The metrics a finished run of ``cfg`` must have stored, each finite."""
    if cfg.task == "distill":
        return ["val/loss"]
    if cfg.task == "finetune":
        if cfg.finetune.mode == "knn":
            return ["test/acc1"]
        # best/*: only when the test used the best checkpoint (a run shorter than one validation
        # interval has none; its last weights are validated by _fit)
        return ["val/acc1", "test/acc1", *(["best/val/acc1"] if cfg.finetune.test_ckpt == "best" else [])]
    from distortkd.evaluation import grid_cells

    return ["mean_acc1", *(f"test/{name}/{sev:g}/acc1" for name, sev, _ in grid_cells(cfg))]


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
    """The results in ``trainer.callback_metrics``: validation and test values of the final (or
    selected) weights and the best monitored value. ``train/*`` (the last batch's values) stay in
    ``csv/metrics.csv``: they cannot be recomputed when a finished run is recovered."""
    out = {k: float(v) for k, v in trainer.callback_metrics.items()
           if torch.as_tensor(v).numel() == 1 and not k.startswith("train/")}
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.best_model_score is not None:
        out[f"best/{ckpt.monitor}"] = float(ckpt.best_model_score)
    return out


class IncompleteResults(RuntimeError):
    """A run ended without every promised metric, or with a non-finite one: it is failed, not ok."""


# Exit codes of a run that a signal stopped (the shell's 128 + signal number); re-running resumes it.
_STOPPED = {"SIGTERM": 143, "SIGINT": 130}
_JOBS: list[str] = []  # statuses of this process's multirun jobs (the basic launcher runs them here)


def _main(cfg: DictConfig, run) -> float:
    """Runs one job; in a multirun a failing job is recorded and the sweep goes on.

    The whole config is checked first, before anything is written. Re-running a finished run
    (metrics.json status ok, same settings) returns its stored metrics without training again, and
    an unfinished one resumes from its last checkpoint, unless ``resume=false``. A run folder that
    holds results of other settings, or results whose settings cannot be read, is refused; one in
    use by another process too (a lock). A stopped run (SIGTERM, SIGINT) exits 143 / 130.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if bad := _empty_override(hydra_cfg.overrides.task):
        return _refuse(bad, multirun=False)  # the whole command is wrong
    lock, owned = rundir.RunLock(run_dir), False
    try:
        check_config(cfg, build_distortion)
        rundir.check_writable(run_dir)
        if _rank_zero():
            lock.acquire()
        if cfg.get("resume", True):
            rundir.check_folder(run_dir, OmegaConf.to_container(cfg, resolve=True))
        if (done := _finished(cfg, run_dir)) is not None:
            if (why := rundir.stale(rundir.read_config(run_dir)[0] or {}, run_dir)):  # or metrics.json's copy
                _JOBS.append("failed")  # its folder keeps its results; the report leaves them out
                return _refuse(f"{run_dir} is finished but {why}; accepted: resume=false to run it again "
                               "on the new checkpoint, or the old checkpoint back", multirun)
            _JOBS.append("ok")
            return float(done.get(cfg.optimize_metric, math.nan))
        owned = True  # from here on, what goes wrong is recorded in the folder
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        with open_dict(cfg):  # a resumed run keeps what it started from, even if upstream re-ran since
            stored, _ = rundir.read_config(run_dir)
            resuming = cfg.get("resume", True) and rundir.holds_results(run_dir) and stored
            cfg.provenance = stored.get("provenance") if resuming and stored.get("provenance") else provenance(cfg)
        if _rank_zero():  # in this order: the other DDP ranks read config.yaml, then metrics.json
            (run_dir / "metrics.json").unlink(missing_ok=True)
            rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        metrics = _complete(cfg, run(cfg, run_dir))
        _write_metrics(run_dir, cfg, {**metrics, "status": "ok"})
        _JOBS.append("ok")
        return float(metrics.get(cfg.optimize_metric, math.nan))
    except (SystemExit, KeyboardInterrupt) as stop:
        if (signame := _signal_of(stop)) is None:
            raise
        message = f"stopped by {signame}; re-run the same command to resume from {run_dir}/checkpoints/last.ckpt"
        if owned:
            _write_metrics(run_dir, cfg, {"status": "stopped", "error": message})
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(_STOPPED[signame]) from None  # a sweep stops too: the whole command was stopped
    except (UserError, NonFiniteLossError, IncompleteResults, InstantiationException) as err:
        message = _with_checkpoint(str(err), run_dir) if isinstance(err, NonFiniteLossError) else _one_line(err)
        if owned:
            _record_failure(run_dir, cfg, message, message + "\n")
        _JOBS.append("failed")
        return _refuse(message, multirun)
    except Exception as err:  # a crashed job must not take the rest of the sweep down
        if owned:
            _record_failure(run_dir, cfg, f"{type(err).__name__}: {err}", traceback.format_exc())
        _JOBS.append("failed")
        if not multirun:
            raise
        print(f"job failed ({type(err).__name__}: {err}); traceback in {run_dir}/error.log", file=sys.stderr)
        return math.nan
    finally:
        lock.release()
        _finish_wandb()


def _one_line(err: Exception) -> str:
    """The error's message; for an object a config node failed to build (``_target_``: the data
    module, the trainer, a callback), the builder's own message, which names the bad value."""
    if not isinstance(err, InstantiationException):
        return str(err)
    cause = err.__cause__ or err
    target = str(err).split("'")[1] if str(err).count("'") >= 2 else "a config node"
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if isinstance(cause, UserError) else f"cannot build {target}: {text}"


def _signal_of(stop: BaseException) -> str | None:
    """Which signal stopped the run: SIGTERM (Lightning's ``SIGTERMException``) or SIGINT (a
    KeyboardInterrupt, which Lightning turns into ``sys.exit(1)`` while handling it); None for an
    ordinary exit such as ``_refuse``'s."""
    if isinstance(stop, SIGTERMException):
        return "SIGTERM"
    if isinstance(stop, KeyboardInterrupt) or isinstance(stop.__context__, KeyboardInterrupt):
        return "SIGINT"
    return None


def _complete(cfg: DictConfig, metrics: dict) -> dict:
    """``metrics`` if every promised metric is there and every number in it is finite."""
    missing = [k for k in promised(cfg) if k not in metrics]
    _, bad = rundir.finite_json(metrics)
    parts = [f"{what} {', '.join(keys[:8])}" for what, keys in (("missing", missing), ("non-finite", bad)) if keys]
    if parts:
        raise IncompleteResults(f"the run produced no valid result: {'; '.join(parts)}")
    return metrics


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


def _finished(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The stored metrics of a finished run in ``run_dir`` (so it is skipped), else None.

    A finished run whose config.yaml was lost gets it back from the copy in metrics.json."""
    metrics, _ = rundir.read_metrics(run_dir)
    if not cfg.get("resume", True) or metrics is None or metrics.get("status") != "ok":
        return None
    if _rank_zero():
        if not (run_dir / "config.yaml").is_file() and isinstance(metrics.get("config"), dict):
            rundir.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(metrics["config"])))
        print(f"already finished: {run_dir} (metrics.json status ok); resume=false runs it again",
              file=sys.stderr)
    return metrics


def _with_checkpoint(message: str, run_dir: Path) -> str:
    """Appends where the last good (finite, never overwritten by a diverged model) state is."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"{message}; no checkpoint was written before"
    try:  # mmap: only global_step is needed, the tensors stay on disk
        step = load_checkpoint(last, mmap=True).get("global_step", "unknown")
    except UserError as err:  # appended, not raised: the run's own failure must still be recorded
        return f"{message}; no usable checkpoint: {err}"
    return f"{message}; last good checkpoint: {last} (global step {step})"


def _record_failure(run_dir: Path, cfg: DictConfig, error: str, log: str) -> None:
    """``metrics.json`` with status failed (the report lists the cell) and ``error.log``."""
    _write_metrics(run_dir, cfg, {"status": "failed", "error": error})
    if _rank_zero():
        rundir.write_text(run_dir / "error.log", log)


def _write_metrics(run_dir: Path, cfg: DictConfig, metrics: dict) -> None:
    """Standard JSON with a copy of the resolved config (the run stays reportable without
    config.yaml); a non-finite number is stored as null (``_complete`` has failed such a run)."""
    if not _rank_zero():
        return
    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - a config that cannot resolve is recorded unresolved
        config = OmegaConf.to_container(cfg, resolve=False)
    clean, _ = rundir.finite_json({**metrics, "config": config})
    rundir.write_json(run_dir / "metrics.json", clean)


def _finish_wandb() -> None:
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()  # otherwise the next multirun job hangs on the open run


class WritableRunRoot(Callback):
    """Checks that the run (or sweep) folder can be written before Hydra creates it: Hydra's own
    ``mkdir`` would end in a stack trace. (A Hydra callback: it runs before the job does.)"""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder: str) -> None:
        try:
            rundir.check_writable(Path(folder))
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def _entry(main) -> None:
    """Runs a Hydra main; a multirun whose every job failed exits 1 (one that partly failed exits
    0: its failed jobs are recorded in their folders and listed by ``distortkd-report``)."""
    _JOBS.clear()
    main()
    if _JOBS and "ok" not in _JOBS:
        print(f"error: all {len(_JOBS)} jobs failed (see the 'job failed' lines above)", file=sys.stderr)
        sys.exit(1)


@hydra.main(config_path=CONF, config_name="distill", version_base="1.3")
def _distill(cfg: DictConfig) -> float:
    return _main(cfg, run_distill)


@hydra.main(config_path=CONF, config_name="finetune", version_base="1.3")
def _finetune(cfg: DictConfig) -> float:
    return _main(cfg, run_finetune)


@hydra.main(config_path=CONF, config_name="evaluate", version_base="1.3")
def _evaluate(cfg: DictConfig) -> float:
    return _main(cfg, run_evaluate)


def distill() -> None:
    _entry(_distill)


def finetune() -> None:
    _entry(_finetune)


def evaluate() -> None:
    _entry(_evaluate)


if __name__ == "__main__":
    {"distill": distill, "finetune": finetune, "evaluate": evaluate}[sys.argv.pop(1)]()
