"""LightningModules: the distiller (ours and Contrastive Inversion) and the fine-tuner/evaluator.

Data flow: the datamodule yields clean ``[0, 1]`` batches; the distortion is applied here, on the
device, to the same crop (seeded per sample in validation/test); each encoder normalises its own
input; the loss returns named terms that are logged as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from distortkd.checkpoints import load_checkpoint
from distortkd.diagnostics import RepresentationMeter
from distortkd.distortions import Distortion
from distortkd.draws import sample_seeds
from distortkd.errors import UserError, unknown
from distortkd.losses import DistillLoss, attention_kl
from distortkd.steps import distill_loss, distill_step, supervised_loss
from distortkd.vit import Encoder, Features, FrozenTeacher, ToTeacher


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and keeps its last good checkpoint."""


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and prefix tokens (as in timm)."""
    skip = getattr(getattr(module, "backbone", module), "no_weight_decay", lambda: set())()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        plain = name.split("backbone.", 1)[-1]
        (no_decay if p.ndim <= 1 or plain in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


SCHEDULE_INTERVALS = ("step", "epoch")  # when the scheduler steps: every optimizer step, or every epoch
COSINE_PERIODS = ("run", "steps_per_epoch")  # the cosine's length, in scheduler steps (see _Base)


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """Linear warm-up from 0, then cosine to ``min_ratio`` × peak over ``total_steps``.

    Counted in scheduler steps (optimizer steps or epochs, as the scheduler is stepped); past
    ``total_steps`` the factor stays at ``min_ratio``.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_schedule(interval: str, cosine_period: str) -> None:
    """Raises UserError for an unknown ``optim.schedule_interval`` or ``optim.cosine_period``."""
    if interval not in SCHEDULE_INTERVALS:
        raise unknown("optim.schedule_interval", interval, SCHEDULE_INTERVALS)
    if cosine_period not in COSINE_PERIODS:
        raise unknown("optim.cosine_period", cosine_period, COSINE_PERIODS)


class _Base(L.LightningModule):
    """Optimiser/scheduler wiring and the finite-loss guard shared by both modules.

    The schedule (``warmup_cosine``) steps every optimizer step (``schedule_interval="step"``) or
    once per epoch (``"epoch"``). ``cosine_period="run"`` spreads the cosine over the whole run;
    ``"steps_per_epoch"`` makes its length the number of optimizer steps in one epoch, counted in
    scheduler steps: Contrastive Inversion's ``CosineAnnealingLR(T_max=126689 // (batch_size *
    gpus))`` stepped once per epoch (see ``distortkd/conf/optim/ci.yaml``).
    """

    def __init__(self, optimizer: Callable, warmup: float, eval_seed: int, min_lr_ratio: float = 0.0,
                 schedule_interval: str = "step", cosine_period: str = "run"):
        super().__init__()
        check_schedule(schedule_interval, cosine_period)
        self.optimizer_factory = optimizer
        self.warmup = warmup
        self.eval_seed = eval_seed
        self.min_lr_ratio = min_lr_ratio
        self.schedule_interval, self.cosine_period = schedule_interval, cosine_period

    def configure_optimizers(self):
        extra = {}
        if self.device.type == "cuda" and "fused" not in getattr(self.optimizer_factory, "keywords", {}):
            extra["fused"] = True  # one kernel for the whole Adam(W) update
        wd = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        opt = self.optimizer_factory(param_groups(self, wd), **extra)
        total = int(self.trainer.estimated_stepping_batches)
        by_epoch = self.schedule_interval == "epoch" or self.cosine_period == "steps_per_epoch"
        per_epoch = self._steps_per_epoch() if by_epoch else None
        if self.schedule_interval == "epoch":
            total = math.ceil(total / per_epoch)
        warm = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        length = per_epoch if self.cosine_period == "steps_per_epoch" else total
        sched = warmup_cosine(opt, length, warm, self.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.schedule_interval}}

    def _steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of this process (its train loader's batches)."""
        if self.trainer.train_dataloader is None:  # Lightning skips it when max_epochs=-1
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise UserError(
                f"optim.schedule_interval={self.schedule_interval} with optim.cosine_period={self.cosine_period} "
                "needs a training set of known length; accepted: a sized dataset, or schedule_interval=step "
                "with cosine_period=run")
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    @staticmethod
    def empty(batch: dict) -> bool:
        """A batch whose every image was undecodable (skipped and counted by the datamodule): the
        step is skipped. (Under DDP a rank with nothing to train would stall the others' gradient
        all-reduce; with ``max_bad_fraction``'s default of 0.1 % a whole bad batch needs tiny batches.)"""
        return len(batch["index"]) == 0

    def seeds(self, batch: dict) -> Tensor:
        return sample_seeds(batch["index"], self.eval_seed)

    def check_finite(self, loss: Tensor) -> None:
        # One host sync per step; the price of never writing a NaN model over a good checkpoint.
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}): "
                "stopped; lower the learning rate or use bf16/fp32"
            )

    def check_finite_weights(self, state: dict[str, Tensor]) -> None:
        # The loss check sees a diverged update one step late: never write it over a good checkpoint.
        bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"weight {bad} is not finite at global step {self.global_step} (epoch {self.current_epoch}): "
                "stopped before saving it; lower the learning rate or use bf16/fp32"
            )


class DistillModule(_Base):
    """Frozen teacher on clean crops, trainable student on the same crops distorted; no labels.

    Args:
        student: trainable encoder (the paper: same architecture and start weights as ``teacher``;
            or a smaller one, whose features ``to_teacher`` maps into the teacher's token space).
        teacher: encoder to freeze.
        distortion: applied on the device to the student's input.
        loss: the distillation loss (``build_loss``); it says what the step computes
            (pooled embeddings, tokens, or tokens and attention taps).
        diagnostics: optional callable ``(student_feats, teacher_feats) -> dict`` logged in validation.
    """

    def __init__(
        self,
        student: Encoder,
        teacher: Encoder,
        distortion: Distortion,
        loss: DistillLoss,
        optimizer: Callable,
        warmup: float = 0.05,
        eval_seed: int = 0,
        compile: bool = False,
        schedule_interval: str = "step",
        cosine_period: str = "run",
    ):
        super().__init__(optimizer, warmup, eval_seed, schedule_interval=schedule_interval,
                         cosine_period=cosine_period)
        self.student = student
        self.teacher = FrozenTeacher(teacher)
        # Trained with the student, kept in the run's checkpoints (a resume needs it), never in an
        # export (``load_encoder_weights`` reads ``student.backbone.*`` only). No parameters and a
        # no-op when student and teacher share width and grid.
        self.to_teacher = ToTeacher.between(student, teacher)
        self.distortion, self.loss = distortion, loss
        self.step_fn = torch.compile(distill_loss) if compile else distill_loss
        # Representation diagnostics (cos CLS/patch, linear CKA, attention KL and top-k IoU) of the
        # student and of the untouched teacher on distorted vs the teacher on clean, per epoch.
        self.meters = {"student": RepresentationMeter(), "teacher": RepresentationMeter()}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if self.empty(batch):
            return None
        out = self.step_fn(self.student, self.teacher, self.distortion, self.loss, batch["image"],
                           None, self.to_teacher)
        self.check_finite(out["loss"])
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"})
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.empty(batch):
            return
        vit = self.student.is_vit and self.teacher.encoder.is_vit  # attention taps need both
        # Training's step, with the taps the diagnostics below read; s is in the teacher's space.
        out, s, t, distorted = distill_step(self.student, self.teacher, self.distortion, self.loss,
                                            batch["image"], self.seeds(batch), self.to_teacher,
                                            taps="attention" if vit else "tokens")
        # The untouched teacher on distorted input: where the student started from.
        base = self.teacher.features(distorted, with_attn=vit)
        metrics = {f"val/{k}": v for k, v in out.items() if k != "loss"}
        cos = lambda a, b: F.cosine_similarity(a.float(), b.float(), dim=-1).mean()  # noqa: E731
        metrics["val/cos_clean"], metrics["val/cos_clean_baseline"] = cos(s.cls, t.cls), cos(base.cls, t.cls)
        if vit:
            metrics["val/attn_kl"] = attention_kl(s.attn, t.attn, 1.0)
        self.meters["student"].update(s, t)
        self.meters["teacher"].update(base, t)
        self.log_dict(metrics, prog_bar=False, sync_dist=True)
        self.log("val/loss", out["loss"], prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        gather = self.all_gather if self.trainer.world_size > 1 else None  # DDP: every rank's shard
        for who, meter in self.meters.items():
            values = meter.compute(gather)
            self.log_dict({f"val/diag/{who}/{k}": float(v) for k, v in values.items()})
            meter.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The teacher is the pretrained checkpoint, unchanged: never duplicated into student files.
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
        }
        self.check_finite_weights(checkpoint["state_dict"])
        checkpoint["distortkd"] = architecture(self.student)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming: put the (frozen, rebuilt) teacher back so loading stays strict for the student.
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})


class FinetuneModule(_Base):
    """Backbone + linear head trained with labels on distorted images; top-1 on distorted eval.

    Modes: ``full`` (everything trains), ``linear`` (frozen backbone, linear probe), ``knn``
    (no training: weighted k-NN on frozen, L2-normalised features, as in DINO).
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        distortion: Distortion,
        optimizer: Callable,
        mode: str = "full",
        warmup: float = 0.05,
        eval_seed: int = 0,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        schedule_interval: str = "step",
        cosine_period: str = "run",
    ):
        super().__init__(optimizer, warmup, eval_seed, schedule_interval=schedule_interval,
                         cosine_period=cosine_period)
        if mode not in ("full", "linear", "knn"):
            raise UserError(f"unknown finetune mode {mode!r}; accepted: full, knn, linear")
        self.encoder, self.mode, self.distortion = encoder, mode, distortion
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        if mode != "full":
            self.encoder.requires_grad_(False)
        self.knn_k, self.knn_t, self.num_classes = knn_k, knn_temperature, num_classes
        acc = partial(MulticlassAccuracy, num_classes=num_classes, top_k=1, average="micro")
        self.val_acc, self.test_acc = acc(), acc()
        self.test_prefix = "test"
        self._bank: tuple[Tensor, Tensor] | None = None
        # Called by test_step with (batch_idx, clean images, distorted images, their Features):
        # what else a test pass measures on the same distorted batch (evaluation's diagnostics),
        # so nothing is distorted or encoded twice. None: the plain top-1.
        self.test_observer: Callable[[int, Tensor, Tensor, Features], None] | None = None

    def on_train_epoch_start(self) -> None:
        if self.mode != "full":
            self.encoder.eval()  # frozen backbone: no dropout / drop-path noise in its features

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if self.empty(batch):
            return None
        loss, logits = supervised_loss(self.encoder, self.head, self.distortion, batch["image"], batch["label"])
        self.check_finite(loss)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        self.log_dict({"train/loss": loss, "train/acc1": acc}, prog_bar=True)
        return loss

    def _predict(self, batch: dict) -> Tensor:
        distorted = self.distortion(batch["image"], self.seeds(batch))
        if self.mode == "knn":
            return self._knn_scores(self.encoder(distorted))
        return self.head(self.encoder(distorted))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.empty(batch):
            return
        self.val_acc(self._predict(batch), batch["label"])
        self.log("val/acc1", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if self.empty(batch):
            return
        if self.test_observer is None or self.mode == "knn":
            logits = self._predict(batch)
        else:  # one forward for both: the head reads the pooled embedding, features().cls
            distorted = self.distortion(batch["image"], self.seeds(batch))
            feats = self.encoder.features(distorted)
            logits = self.head(feats.cls)
            self.test_observer(batch_idx, batch["image"], distorted, feats)
        self.test_acc(logits, batch["label"])
        self.log(f"{self.test_prefix}/acc1", self.test_acc)

    def on_validation_epoch_start(self) -> None:
        if self.mode == "knn":
            self._bank = self._feature_bank()

    on_test_epoch_start = on_validation_epoch_start

    @torch.no_grad()
    def _feature_bank(self) -> tuple[Tensor, Tensor]:
        """L2-normalised features ``[M, D]`` and labels ``[M]`` of the (distorted) training set.

        The bank's images get the eval transform and the per-sample seeded distortion (DINO's
        eval_knn.py does the same): random crops and flips would make k-NN accuracy depend on
        ``data.augment`` and on the random state, not on the features.
        """
        feats, labels = [], []
        dm, world = self.trainer.datamodule, self.trainer.world_size
        loader = dm.bank_dataloader(world, self.trainer.global_rank)
        for batch in dm.device_batches(loader, self.device):
            x = self.distortion(batch["image"], self.seeds(batch))
            feats.append(F.normalize(self.encoder(x).float(), dim=-1))
            labels.append(batch["label"])
        feats, labels = torch.cat(feats), torch.cat(labels)
        if world > 1:
            # Rank r encoded rows r, r + world, ... (its shard; the last rows repeat the first to
            # even the shards): interleaving the gathered shards gives the one-device bank row for
            # row, in its order (which breaks top-k ties), and the repeats are cut off.
            rows = len(loader.dataset)
            feats = self.all_gather(feats).transpose(0, 1).flatten(0, 1)[:rows]
            labels = self.all_gather(labels).transpose(0, 1).flatten(0, 1)[:rows]
        return feats, labels

    def _knn_scores(self, query: Tensor) -> Tensor:
        """Class scores ``[B, classes]``: top-k cosine neighbours voting with ``exp(sim / T)``."""
        bank, bank_labels = self._bank
        sim = F.normalize(query.float(), dim=-1) @ bank.T
        top, idx = sim.topk(min(self.knn_k, len(bank)), dim=-1)
        votes = F.one_hot(bank_labels[idx], self.num_classes).float() * (top / self.knn_t).exp()[..., None]
        return votes.sum(1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite_weights(checkpoint["state_dict"])
        checkpoint["distortkd"] = architecture(self.encoder)


def architecture(encoder: Encoder) -> dict:
    """What a checkpoint records about its encoder, to refuse loading into another architecture."""
    cfg = getattr(encoder.backbone, "pretrained_cfg", {}) or {}
    return {"arch": cfg.get("architecture"), "embed_dim": encoder.embed_dim,
            "mean": encoder.mean.flatten().tolist(), "std": encoder.std.flatten().tolist()}


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """A run folder's ``checkpoints/best.ckpt``, else ``last.ckpt``, else None."""
    for name in ("best.ckpt", "last.ckpt"):
        if (path := Path(run_dir) / "checkpoints" / name).is_file():
            return path
    return None


def load_encoder_weights(encoder: Encoder, path: str | Path, *, trust: bool = False) -> dict:
    """Loads a distilled student (or a fine-tuned backbone) checkpoint into ``encoder``.

    Accepts a Lightning ``.ckpt`` from a distill run (``student.*`` keys) or a finetune run
    (``encoder.*`` keys), or a plain ``.safetensors``/``.pth`` state dict of the timm backbone.
    ``trust``: allow a file that needs full unpickling (it may run code; see ``load_checkpoint``).

    Raises:
        UserError: missing, damaged or untrusted file, or weights made for another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"init checkpoint {str(path)!r} does not exist")
    ckpt = load_checkpoint(path, trust=trust)
    meta = ckpt.get("distortkd", {})
    meta = meta if isinstance(meta, dict) else {}
    state = ckpt["state_dict"]
    for prefix in ("student.backbone.", "encoder.backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    own = encoder.backbone.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad or len(state) != len(own):
        mine = getattr(encoder.backbone, "pretrained_cfg", {}).get("architecture")
        k = bad[0] if bad else next(iter(set(state) - set(own)))
        theirs = tuple(state[k].shape) if k in state else "missing"
        raise UserError(
            f"checkpoint {str(path)!r} does not fit model {mine!r} (made for "
            f"{meta.get('arch', 'another architecture')!r}: {k} is {theirs}, expected "
            f"{tuple(own[k].shape) if k in own else 'absent'}); pass the model config it was trained with"
        )
    encoder.backbone.load_state_dict(state)
    return meta
