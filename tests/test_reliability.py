"""Reliability and scale: atomic checkpoints, exact resume after SIGKILL, bad input as one line,
sweeps that survive a failing job (Hydra's basic launcher and submitit), DDP equal to one process.

Unit-level bad-input checks live beside their code and are not repeated here: unknown model name,
missing weights file, offline hub for weights (test_vit.py); distortion names and parameter ranges
(test_distortions.py); label fraction that empties a class, missing local dataset, offline hub for
data, corrupt images (test_data.py); wrong-architecture ``.ckpt`` (test_cli.py). Here the same
mistakes go through the real entry points: one ``error: ...`` line and exit code 2.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.callbacks import Callback
from test_cli import TINY, _compose

from distortkd import build, cli, report, rundir, training
from distortkd.errors import UserError
from distortkd.wandb_utils import run_id

BIN = Path(sys.executable).parent
ANY_DATA = [a for a in TINY if not a.startswith("data=")]  # TINY without its dataset choice
BLUR = ["distortion=blur_weak", "distortion.params.kernel_size=5", "distortion.params.sigma=1.0"]


def _env(root: Path, tests: bool = False) -> dict:
    """The CLIs' environment; ``tests`` puts this folder on the path (for ``faults``)."""
    env = {**os.environ, "DISTORTKD_RUNS": str(root), "CI": "1", "PYTHONUNBUFFERED": "1"}
    if tests:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    return env


def _cli(entry: str, args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """Runs ``distortkd-<entry> args`` in this process: (exit code, stderr)."""
    quiet = ["hydra/job_logging=none", "hydra/hydra_logging=none"]  # no handlers on pytest's streams
    monkeypatch.setattr(sys, "argv", [f"distortkd-{entry}", *args, *quiet])
    try:
        getattr(cli, entry)()
        code = 0
    except SystemExit as stop:
        code = stop.code
    finally:
        GlobalHydra.instance().clear()
    return code, capsys.readouterr().err


def _run_folder(root: Path, task: str = "distill") -> Path:
    (run,) = [p for p in (root / "test" / task).iterdir() if p.is_dir()]
    return run


# ------------------------------------------------------------------ checkpoints and run identity


def test_wandb_run_id_is_stored_once_and_reused(tmp_path):
    first, again = run_id(tmp_path / "run"), run_id(tmp_path / "run")
    assert first == again == (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    assert len(first) == 12 and run_id(tmp_path / "other") != first
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["wandb_id.txt"]  # no temp file left


def test_checkpoint_write_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    io, path = training.AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    hparams = {"rrc_scale": OmegaConf.create([0.08, 1.0])}  # what the datamodule's hparams hold
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "datamodule_hyper_parameters": hparams}, path)
    loaded = torch.load(path, weights_only=True)  # torch's default: Lightning's resume needs it
    assert loaded["datamodule_hyper_parameters"]["rrc_scale"] == [0.08, 1.0]

    def killed_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("resume_step", [None, 6])
def test_csv_log_keeps_rows_before_the_resumed_checkpoint(tmp_path, resume_step):
    old = training.ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        old.log_metrics({"train/loss": float(step)}, step=step)
    old.log_metrics({"val/loss": 9.0}, step=5)  # an epoch's validation, at its last batch's step
    old.log_metrics({"train/loss": 7.0}, step=6)  # logged after the checkpoint at global step 6
    old.save()
    new = training.ResumableCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    new.experiment.resume_step = resume_step
    new.log_metrics({"val/loss": 8.0}, step=5)  # validation run again on resume: replaces the old row
    new.log_metrics({"train/loss": 6.5}, step=6)
    new.save()
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [(int(r["step"]), r["train/loss"] or r["val/loss"]) for r in csv.DictReader(f)]
    kept = [(s, f"{float(s)}") for s in range(6)] if resume_step else []
    assert rows == [*kept, (5, "8.0"), (6, "6.5")]


class _Toy(L.LightningModule):
    """A linear model whose validation loss only gets worse: ``best.ckpt`` stays at epoch 1."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _StepOfLastCkpt(Callback):
    def __init__(self, path: Path):
        self.path, self.seen = path, []

    def on_train_batch_end(self, trainer, *args):
        if self.path.is_file():
            self.seen.append(torch.load(self.path, weights_only=True)["global_step"])


@pytest.mark.parametrize("every", [None, 2])
def test_last_ckpt_refreshed_every_epoch_and_every_n_steps(tmp_path, every):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(12, 4)), batch_size=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    probe = _StepOfLastCkpt(last)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, plugins=[training.AtomicCheckpointIO()],
                        callbacks=[*training.checkpoint_callbacks(tmp_path, "val/loss", "min", every), probe])
    trainer.fit(_Toy(), data, data)
    # Lightning's own save_last=True leaves last.ckpt at the best epoch (step 6) when loss worsens
    assert torch.load(last, weights_only=True)["global_step"] == 18
    assert torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 6
    if every:  # mid-epoch, before the first validation: steps 2 and 4 of epoch 1
        assert probe.seen[:4] == [2, 2, 4, 4]


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(tmp_path):
    """SIGKILL after a mid-epoch checkpoint, re-run the same command: bit-identical to no kill."""
    args = [*TINY, "data.limit_train=96", "data.limit_eval=32", "trainer.max_epochs=2", "seed=3",
            "checkpoint.every_n_train_steps=1", "trainer.deterministic=true"]  # 6 steps per epoch
    exe = str(BIN / "distortkd-distill")
    log = (tmp_path / "whole.log").open("w")  # a file, not a pipe: nobody reads it while this runs
    whole = subprocess.Popen([exe, *args], env=_env(tmp_path / "whole"), stdout=subprocess.DEVNULL, stderr=log)
    die = ["+callbacks.die._target_=faults.KillAtStep", "+callbacks.die.step=3"]  # mid-epoch 1
    killed = subprocess.run([exe, *args, *die], env=_env(tmp_path / "killed", tests=True),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (last,) = (tmp_path / "killed").glob("test/distill/*/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed = subprocess.run([exe, *args], env=_env(tmp_path / "killed"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    assert whole.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    log.close()
    runs = [_run_folder(tmp_path / name) for name in ("whole", "killed")]
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert [m.pop("config")["paths"]["root"] for m in metrics] == [str(tmp_path / n) for n in ("whole", "killed")]
    assert metrics[0] == metrics[1] and metrics[0]["status"] == "ok" and "val/loss" in metrics[0]
    weights = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in runs]
    assert weights[0]["global_step"] == weights[1]["global_step"] == 12
    for key, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][key]), key
    logs = [(r / "csv" / "metrics.csv").read_text().splitlines() for r in runs]  # rows before the kill kept
    assert logs[0] == logs[1] and len(logs[0]) > 12, logs


# ------------------------------------------------------------------ bad input through the CLIs


@pytest.mark.parametrize(
    "entry,args,needle",
    [
        ("distill", ["model.name=vit_nope"], "unknown model 'vit_nope'"),
        ("distill", ["loss.fn=kl"], "unknown loss function 'kl'; accepted: contrastive, multilevel"),
        ("distill", ["distortion.family=fog"], "'fog'"),
        ("distill", ["distortion=mask_weak", "distortion.params.ratio=1.5"], "1.5"),
        ("distill", ["data=cifar10", "data.path=/nonexistent/cifar10"], "/nonexistent/cifar10"),
        ("distill", ["data=cifar10"], "uoft-cs/cifar10"),  # HF_HUB_OFFLINE=1 (conftest), no cache
        ("finetune", ["method=supervised", "data.label_fraction=0.00001"], "leaves a class without"),
        ("distill", ["data.path="], "override 'data.path=' has an empty value"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(entry, args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path))
    data = [] if any(a.startswith("data=") for a in args) else ["data=fashion_mnist"]
    overrides = [*ANY_DATA, *data, f"data.cache_dir={tmp_path / 'hf'}", *args]
    code, err = _cli(entry, overrides, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and needle in last, err[-2000:]


@pytest.mark.parametrize(
    "args,needle",
    [(["model=vit_nope"], "Available options in 'model'"), (["foo==bar"], "Error parsing override 'foo==bar'"),
     (["data.pth=/x"], "Could not override 'data.pth'")],
)
def test_hydra_rejects_unknown_group_option_and_malformed_override(args, needle, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path))
    code, err = _cli("distill", [*TINY, *args], monkeypatch, capsys)
    assert code == 1 and needle in err and "Traceback" not in err


def test_init_checkpoint_of_another_architecture_is_one_line(tmp_path, monkeypatch, capsys):
    from distortkd.vit import build_vit

    wider = tmp_path / "wider.pth"
    torch.save(build_vit("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                         embed_dim=48, depth=2, num_heads=2).state_dict(), wider)
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path))
    code, err = _cli("finetune", [*TINY, f"init={wider}"], monkeypatch, capsys)
    assert code == 2 and "does not fit model" in err.strip().splitlines()[-1]


def test_nan_loss_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path))
    args = [*TINY, "optim.optimizer.lr=1e30", "optim.warmup=0", "checkpoint.every_n_train_steps=1"]
    code, err = _cli("distill", args, monkeypatch, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and ("not finite" in last or "loss is nan" in last), err
    assert "global step" in last and "last good checkpoint" in last
    run = _run_folder(tmp_path)
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


# ------------------------------------------------------------------ sweeps


@pytest.mark.slow
def test_sweep_with_a_failing_job_finishes_and_the_report_lists_it(tmp_path, monkeypatch, capsys):
    """Basic launcher: the cifar10 job fails (offline, no copy), fashion_mnist finishes."""
    sweep = [*ANY_DATA, "data=fashion_mnist,cifar10", f"data.cache_dir={tmp_path / 'hf'}"]
    proc = subprocess.run([str(BIN / "distortkd-distill"), "-m", *sweep], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "job failed: " in proc.stderr, proc.stderr[-3000:]
    runs = {p.name.split("_")[0]: p for p in (tmp_path / "test" / "distill").iterdir()}
    ok, failed = (json.loads((runs[n] / "metrics.json").read_text()) for n in ("fashion", "cifar10"))
    assert ok["status"] == "ok" and failed["status"] == "failed" and "uoft-cs/cifar10" in failed["error"]
    assert "uoft-cs/cifar10" in (runs["cifar10"] / "error.log").read_text()
    assert report.main([str(tmp_path / "test"), "--out", str(tmp_path / "report")]) == 0
    assert str(runs["cifar10"]) in (tmp_path / "report" / "results.md").read_text()

    # Same command again: the finished job is skipped; other settings in its folder are refused.
    monkeypatch.setenv("DISTORTKD_RUNS", str(tmp_path))
    stamp = (runs["fashion"] / "metrics.json").stat().st_mtime_ns
    code, err = _cli("distill", TINY, monkeypatch, capsys)
    assert code == 0 and "already finished" in err
    code, err = _cli("distill", [*TINY, "distortion.params.sigma=0.9"], monkeypatch, capsys)
    assert code == 2 and "distortion.params.sigma: 0.5 there, 0.9 now" in err, err
    assert (runs["fashion"] / "metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_sweep(tmp_path):
    sweep = [*TINY, "hydra/launcher=submitit_local", "seed=0,1"]
    proc = subprocess.run([str(BIN / "distortkd-distill"), "-m", *sweep], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "test" / "distill").iterdir())
    assert [r.name[-2:] for r in runs] == ["s0", "s1"]
    assert all(json.loads((r / "metrics.json").read_text())["status"] == "ok" for r in runs)
    assert (tmp_path / "test" / ".submitit").is_dir()


def test_slurm_launcher_config_requests_one_task_per_gpu_and_requeues(tmp_path, monkeypatch):
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = _compose_hydra(["hydra/launcher=slurm", "trainer=ddp", "hydra.launcher.gpus_per_node=8",
                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"])
    params = {k: cfg.hydra.launcher[k] for k in cfg.hydra.launcher if k not in ("_target_", "submitit_folder", "name")}
    # What hydra-submitit-launcher hands to submitit (its launch()), up to submitting.
    init = {"slurm_max_num_timeout": params.pop("max_num_timeout")}
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in params.items()}
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm", **init)
    executor.update_parameters(**params)
    sbatch = executor._executor._make_submission_file_text("python -m job", "0")
    for line in ("--gpus-per-node=8", "--ntasks-per-node=8", "--nodes=2", "--partition=gpu",
                 "--signal=USR1@120", "--requeue"):
        assert f"#SBATCH {line}" in sbatch, line


def _compose_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name="distill", overrides=overrides, return_hydra_config=True)


def test_lightning_launched_ddp_inside_a_multirun_is_refused():
    """Lightning re-runs sys.argv for each extra process: under -m, the whole sweep (issue 11300)."""
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(UserError, match="DDPStrategy with 2 devices .* hydra/launcher=slurm .* torchrun"):
        training.check_launch(ddp, multirun=True)
    training.check_launch(ddp, multirun=False)  # one run: Lightning re-runs just that command
    spawn = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    training.check_launch(spawn, multirun=True)  # spawn pickles the job instead of re-running argv


def test_ddp_under_torchrun_or_slurm_inside_a_multirun_is_allowed(monkeypatch):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "GROUP_RANK": "0",
                       "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert trainer.strategy.cluster_environment.creates_processes_externally  # torchrun did
    training.check_launch(trainer, multirun=True)


# ------------------------------------------------------------------ DDP: two processes = one


class _FirstStep(Callback):
    """The first step's loss and the (all-reduced) student gradients just before the update."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters()
                      if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = float(outputs["loss"])


def _first_step(world: int) -> tuple[float, dict, dict]:
    """One optimizer step of the tiny distiller on a fixed batch of 16, split over ``world`` ranks,
    then a validation of the 16 images: (loss, gradients, the representation diagnostics).

    Blur is deterministic and there is no augmentation, so every rank sees exactly its 16 / world
    images; DDP averages gradients, which matches the mean losses over the whole batch.
    """
    from hydra.utils import instantiate

    from distortkd.modules import DistillModule

    cfg = _compose("distill", [*TINY, *BLUR])
    torch.manual_seed(0)
    student, teacher = build.build_model(cfg.model), build.build_model(cfg.model)
    teacher.load_state_dict(student.state_dict())
    module = DistillModule(student, teacher, build.build_distortion(cfg.distortion),
                           build.build_loss(cfg.loss), optimizer=instantiate(cfg.optim.optimizer))
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    data = [{"image": images[i], "index": torch.tensor(i)} for i in range(16)]
    probe = _FirstStep()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    loader = torch.utils.data.DataLoader(data, batch_size=16 // world)
    trainer.fit(module, loader)
    trainer.validate(module, loader, verbose=False)
    diag = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/diag/")}
    return probe.loss, probe.grads, diag


def _torchrun_worker(out: Path) -> None:
    """Each rank: its first-step loss and gradients, then the real CLI with its writes recorded."""
    rank = int(os.environ["RANK"])
    loss, grads, diag = _first_step(world=2)
    torch.save({"loss": loss, "grads": grads, "diag": diag}, out / f"step{rank}.pt")
    writes, loaders = [], []
    original = rundir.write_text  # write_json writes through it too
    rundir.write_text = lambda path, obj, f=original: (writes.append(Path(path).name), f(path, obj))[1]
    start = training.ResumeState.on_train_start

    def record_loader(self, trainer, module):  # Lightning re-made it with its DistributedSampler
        loaders.append([type(trainer.train_dataloader).__name__, type(trainer.train_dataloader.sampler).__name__])
        start(self, trainer, module)

    training.ResumeState.on_train_start = record_loader
    sys.argv = ["distortkd-distill", *TINY, "trainer.accelerator=cpu", "trainer.devices=2",
                "trainer.strategy=ddp"]
    cli.distill()
    (out / f"writes{rank}.json").write_text(json.dumps({"writes": writes, "loaders": loaders}))


@pytest.mark.slow
def test_ddp_two_processes_match_one_and_only_rank_zero_writes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           "29517", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(tmp_path / "runs"), capture_output=True, text=True, timeout=400,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"step{r}.pt") for r in (0, 1)]
    loss, grads, diag = _first_step(world=1)
    assert loss > 0 and max(float(g.abs().max()) for g in grads.values()) > 0  # blur: a real step
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - loss) < 1e-5
    assert grads.keys() == ranks[0]["grads"].keys() and len(grads) > 10
    for name, grad in grads.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
    assert "val/diag/student/cka_cls" in diag and len(diag) == 10  # over all 16 images on every rank
    for r in ranks:
        assert r["diag"] == pytest.approx(diag, rel=1e-5, abs=1e-6)
    seen = [json.loads((tmp_path / f"writes{r}.json").read_text()) for r in (0, 1)]
    assert {"config.yaml", "metrics.json"} <= set(seen[0]["writes"]) and seen[1]["writes"] == []
    assert seen[0]["loaders"] == seen[1]["loaders"] == [["ResumableLoader", "DistributedSampler"]]
    metrics = json.loads((_run_folder(tmp_path / "runs") / "metrics.json").read_text())
    assert metrics["status"] == "ok" and "val/loss" in metrics


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/test_reliability.py OUT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(1)
    _torchrun_worker(Path(sys.argv[1]))
