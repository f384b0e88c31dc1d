"""Contrastive Inversion as its authors ran it: optim=ci, the per-epoch schedule, negatives over DDP."""

import math
import os
import socket
import subprocess
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distortkd import cli
from distortkd.checks import check_config
from distortkd.errors import UserError
from distortkd.losses import LOSSES
from distortkd.modules import _Base

ROOT = Path(__file__).resolve().parent.parent


def _compose(entry: str, overrides: list[str]):
    with initialize_config_dir(config_dir=cli.CONF, version_base="1.3"):
        return compose(config_name=entry, overrides=overrides)


def test_optim_ci_is_the_ci_code_recipe():
    cfg = _compose("distill", ["model=clip_rn101", "loss=contrastive", "method=ci", "optim=ci"])
    opt = instantiate(cfg.optim.optimizer)([nn.Parameter(torch.zeros(2))])
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0 and group["betas"] == (0.9, 0.999)
    assert cli.schedule(cfg.optim) == {"schedule_interval": "epoch", "cosine_period": "steps_per_epoch"}
    assert cfg.optim.warmup == 0 and cfg.loss.params.variant == "symmetric" and cfg.loss.params.tau == 0.1
    ours = _compose("distill", ["loss=contrastive", "optim=distill"])
    assert cli.schedule(ours.optim) == {"schedule_interval": "step", "cosine_period": "run"}
    assert type(instantiate(ours.optim.optimizer)([nn.Parameter(torch.zeros(2))])) is torch.optim.AdamW


@pytest.mark.parametrize("override,accepted", [
    ("loss.params.variant=two_way", "accepted: one_way, symmetric"),
    ("optim.schedule_interval=batch", "accepted: epoch, step"),
    ("optim.cosine_period=forever", "accepted: run, steps_per_epoch"),
])
def test_bad_ci_settings_are_refused_before_any_work(override, accepted):
    cfg = _compose("distill", ["loss=contrastive", "optim=ci", override])
    with pytest.raises(UserError, match=accepted) as err:
        check_config(cfg, cli.build_distortion)
    assert override.split("=")[1] in str(err.value) and "\n" not in str(err.value)


def test_make_trains_ci_students_with_ci_recipe_and_ours_on_request():
    def ci_distill_line(*extra):
        out = subprocess.run(["make", "-n", "distill-table1", *extra], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return next(line for line in out.splitlines() if "distortkd-distill" in line and "method=ci" in line)

    assert "loss=contrastive" in ci_distill_line() and " optim=ci" in ci_distill_line()
    assert " optim=distill" in ci_distill_line("CI_OPTIM=distill")
    finetune = subprocess.run(["make", "-n", "finetune-table1"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    ci_finetune = [line for line in finetune.splitlines() if "distortkd-finetune" in line and "method=ci" in line]
    assert ci_finetune and "optim=" not in ci_finetune[0]  # one fine-tuning protocol for every method


class _Tiny(_Base):
    """The shared optimiser/scheduler wiring on a linear layer; records (epoch, lr) at every step."""

    def __init__(self, **schedule):
        super().__init__(partial(torch.optim.Adam, lr=0.1, weight_decay=0.0), warmup=0, eval_seed=0, **schedule)
        self.lin, self.lrs = nn.Linear(2, 1), []

    def training_step(self, batch, batch_idx):
        self.lrs.append((self.current_epoch, self.trainer.optimizers[0].param_groups[0]["lr"]))
        return self.lin(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 steps per epoch


def _lrs(epochs: int, max_steps: int = -1, **schedule) -> list[tuple[int, float]]:
    module = _Tiny(**schedule)
    L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module)
    return module.lrs


@pytest.mark.parametrize("period,length", [("run", 3), ("steps_per_epoch", 4)])
def test_epoch_schedule_changes_lr_only_at_epoch_boundaries(period, length):
    lrs = _lrs(3, schedule_interval="epoch", cosine_period=period)
    assert len(lrs) == 12
    for epoch in range(3):
        seen = {lr for e, lr in lrs if e == epoch}
        assert len(seen) == 1  # constant within the epoch
        # cosine over `length` scheduler steps (epochs), as CosineAnnealingLR(T_max=length)
        assert seen.pop() == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * epoch / length)))
    per_step = _lrs(2, schedule_interval="step")
    assert len({lr for e, lr in per_step if e == 0}) == 4  # the default still steps every batch


def test_epoch_schedule_when_only_max_steps_bounds_the_run():
    # max_epochs=-1: Lightning does not load the train data to count steps; the epoch length still counts
    lrs = _lrs(-1, max_steps=8, schedule_interval="epoch", cosine_period="run")
    assert [lr for _, lr in lrs] == pytest.approx([0.1] * 4 + [0.05] * 4)  # 2 epochs: cos(0), cos(pi/2)


# -- negatives across DDP processes -------------------------------------------------------------

SPLITS = {"equal": (4, 4), "unequal": (3, 5)}  # local batch sizes of ranks 0 and 1


def _problem():
    """The same tiny student and global batch (8 inputs, 8 fixed teacher embeddings) everywhere."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
    return student, torch.randn(8, 6), torch.randn(8, 5)


def _step(student: nn.Module, x, t, variant: str) -> tuple[float, dict]:
    """One training loss through the registry entry training uses, and the gradients it leaves."""
    loss = LOSSES["contrastive"](student(x), t, tau=0.1, variant=variant)["loss"]
    loss.backward()
    grads = {n.removeprefix("module."): p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    return loss.item(), grads


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        student, x, t = _problem()
        ddp = nn.parallel.DistributedDataParallel(student)  # averages gradients over the 2 processes
        results = {}
        for split, sizes in SPLITS.items():
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            for variant in ("one_way", "symmetric"):
                results[split, variant] = _step(ddp, x[local], t[local], variant)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~17 s: two spawned processes import torch
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    student, x, t = _problem()
    for variant in ("one_way", "symmetric"):
        loss, grads = _step(student, x, t, variant)  # one process, all 8 samples
        assert max(float(g.abs().max()) for g in grads.values()) > 1e-3  # a real gradient
        for split in SPLITS:
            for r in ranks:
                r_loss, r_grads = r[split, variant]
                assert r_loss == pytest.approx(loss, abs=1e-5), (split, variant)
                assert r_grads.keys() == grads.keys()
                for name, grad in grads.items():
                    torch.testing.assert_close(r_grads[name], grad, rtol=1e-5, atol=1e-5,
                                               msg=f"{split} {variant} {name}")
