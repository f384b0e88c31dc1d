"""Config factories: a Hydra/OmegaConf config node in, a plain object out.

The one place that turns ``model/``, ``distortion/`` and ``loss/`` nodes into an encoder, a
distortion and a loss function, and a run's config into the checkpoint it builds on. The CLIs,
evaluation, export, notebooks and tests all build through here, so an object is built the same
way everywhere. Nothing here knows about Hydra's entry points.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distortkd import distortions, rundir
from distortkd.errors import UserError
from distortkd.losses import DistillLoss, make_loss
from distortkd.modules import load_encoder_weights, run_checkpoint
from distortkd.vit import Encoder, build_encoder


def _plain(node) -> dict:
    """A config node as a plain dict (None and empty nodes as {})."""
    return {} if node is None else OmegaConf.to_container(node, resolve=True)


def build_model(cfg: DictConfig, pretrained: bool | None = None, *, trust: bool = False):
    """The encoder a ``model/`` config describes.

    Weights: the hub (``pretrained``), a local timm ``weights_file`` (``.safetensors``/``.pth``), or a
    ``.ckpt`` of one of our runs (a distilled student or a fine-tuned backbone). ``pretrained=False``
    builds the architecture only (weights about to be loaded from elsewhere). ``trust``: allow a
    ``.ckpt`` that needs full unpickling (``trust_checkpoint=true``; it may run code).
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
        load_encoder_weights(encoder, cfg.weights_file, trust=trust)
    return encoder


def build_teacher(cfg: DictConfig | None, model: DictConfig, student: Encoder, *, trust: bool = False) -> Encoder:
    """The teacher a ``teacher/`` config describes, for ``student`` (built from ``model``).

    ``teacher=same`` (``same: true``, or no teacher node: older configs): the student's own model
    config with the student's start weights copied, even for random-init models (the paper's
    setting; built exactly as before the teacher group existed). Any other teacher is built from
    its own config: its own architecture and weights (``pretrained``/``weights_file``).
    """
    if cfg is None or cfg.get("same", False):
        teacher = build_model(model, trust=trust)
        teacher.load_state_dict(student.state_dict())  # identical start even for random-init models
        return teacher
    return build_model(cfg, trust=trust)


def check_teacher(student: Encoder, teacher: Encoder, loss: DictConfig, teacher_name: str) -> None:
    """Refuses a student/teacher pair the loss cannot compare, in one line.

    Raises:
        UserError: different input channels; the contrastive loss with different embedding widths
            (InfoNCE has no projection); a token or attention term (β or γ ≠ 0) with a non-ViT.
    """
    s_chans, t_chans = student.mean.numel(), teacher.mean.numel()
    if s_chans != t_chans:
        raise UserError(f"teacher {teacher_name!r} takes {t_chans}-channel images, the student {s_chans}; "
                        f"accepted: a teacher with in_chans={s_chans}")
    params = _plain(loss.get("params"))
    if loss.fn == "contrastive":
        if student.embed_dim != teacher.embed_dim:
            raise UserError(f"loss=contrastive compares embeddings of equal width; teacher {teacher_name!r} has "
                            f"{teacher.embed_dim}, the student {student.embed_dim}; accepted: a teacher of width "
                            f"{student.embed_dim}, or loss=multilevel")
        return
    tokens = params.get("beta", 1.0) != 0 or params.get("gamma", 1.0) != 0  # multilevel_loss's defaults
    if tokens and not (student.is_vit and teacher.is_vit):
        which = "teacher " + repr(teacher_name) if not teacher.is_vit else "the student"
        raise UserError(f"loss {loss.name!r} (beta={params.get('beta', 1.0)}, gamma={params.get('gamma', 1.0)}) "
                        f"needs patch tokens and attention, and {which} is not a ViT; accepted: ViT student "
                        "and teacher, or loss=global (CLS only)")


def build_distortion(cfg: DictConfig) -> distortions.Distortion:
    return distortions.build(cfg.family, **_plain(cfg.params))


def build_loss(cfg: DictConfig) -> DistillLoss:
    """The ``loss/`` node's loss with its parameters bound; it says what it reads (``needs``)."""
    return make_loss(cfg.fn, **_plain(cfg.params))


def schedule(cfg: DictConfig) -> dict:
    """The ``optim`` node's scheduler options (``optim=ci`` steps its cosine per epoch)."""
    return {"schedule_interval": cfg.get("schedule_interval", "step"), "cosine_period": cfg.get("cosine_period", "run")}


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


def upstream(cfg: DictConfig) -> dict:
    """Which checkpoint this run builds on (``provenance``, recorded in its config.yaml).

    A checkpoint inside another run's folder is used only if that run finished (metrics.json
    status ok): never a student or a fine-tune that was killed mid-epoch, unless
    ``allow_unfinished=true`` (recorded too).
    """
    allow = cfg.get("allow_unfinished", False)
    # The model's own weights file (the demo's teacher, a local copy of a hub checkpoint): what the
    # teacher, or the supervised baseline's start, is. A missing file is the model builder's error.
    weights = cfg.model.get("weights_file")
    out = {"weights": rundir.checked_upstream(Path(weights), allow)} if weights and Path(weights).is_file() else {}
    if cfg.task == "finetune":
        path = resolve_init(cfg)
        return out if path is None else {"init": rundir.checked_upstream(Path(path), allow), **out}
    if cfg.task == "evaluate":
        name = "best.ckpt" if cfg.finetune.test_ckpt == "best" else "last.ckpt"
        path = Path(cfg.finetune_run) / "checkpoints" / name if cfg.ckpt == "auto" else Path(cfg.ckpt)
        if not path.is_file():
            raise UserError(f"checkpoint {str(path)!r} does not exist; run the finetune job first or pass ckpt=")
        return {"checkpoint": rundir.checked_upstream(path, allow), **out}
    return out


def provenance(cfg: DictConfig) -> dict:
    """``cfg.provenance`` as ``_main`` recorded it, else worked out now (a notebook, a test)."""
    return OmegaConf.to_container(cfg.provenance) if cfg.get("provenance") is not None else upstream(cfg)
