"""The whole config checked before any work: one line naming the bad value and the accepted ones.

Every entry point calls :func:`check_config` before it writes a file or loads a byte of data, so a
typo in a number fails in a second, not after the teacher has been built or an epoch has run.
Names (models, distortions, losses, datasets) are checked by the registries that build them;
distortion parameters by the distortions' own constructors (``distortions.build``).
"""

from __future__ import annotations

import math
import numbers

from omegaconf import DictConfig, OmegaConf

from distortkd import distortions, owndata
from distortkd.benchmarks import BENCHMARKS, stored_cells
from distortkd.errors import UserError, unknown
from distortkd.losses import CONTRASTIVE_VARIANTS, LOSSES
from distortkd.modules import check_schedule

METHODS = ("ours", "supervised", "ci")
FINETUNE_MODES = ("full", "linear", "knn")
TEST_CKPTS = ("last", "best")
SUITES = ("paper", "heldout", *BENCHMARKS)  # benchmarks: the published pre-corrupted files


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require(ok: bool, key: str, value, accepted: str) -> None:
    if not ok:
        raise UserError(f"{key}={value!r} is not accepted; accepted: {accepted}")


def _positive(cfg: DictConfig, key: str, *, integer: bool = False, nullable: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and nullable:
        return
    kind = _int(value) if integer else _number(value) and math.isfinite(value)
    accepted = f"{'an integer' if integer else 'a finite number'} > 0" + (", or null" if nullable else "")
    _require(kind and value > 0, key, value, accepted)


def _non_negative(cfg: DictConfig, key: str, *, integer: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    kind = _int(value) if integer else _number(value) and math.isfinite(value)
    _require(kind and value >= 0, key, value, f"{'an integer' if integer else 'a number'} >= 0, or null")


def check_common(cfg: DictConfig) -> None:
    """Keys every entry point shares: method, seed, threads, trainer length, data sizes."""
    _require(cfg.method in METHODS, "method", cfg.method, ", ".join(METHODS))
    _require(_int(cfg.seed), "seed", cfg.seed, "an integer")
    _non_negative(cfg, "threads", integer=True)
    for key in ("trainer.max_epochs", "trainer.max_steps"):
        value = OmegaConf.select(cfg, key)
        _require(value is None or (_int(value) and (value >= 1 or value == -1)), key, value,
                 "an integer >= 1, -1 (no limit), or null")
    _positive(cfg, "data.batch_size", integer=True)
    _positive(cfg, "data.eval_batch_size", integer=True, nullable=True)
    _non_negative(cfg, "data.num_workers", integer=True)
    fraction = cfg.data.get("label_fraction", 1.0)
    _require(_number(fraction) and 0 < fraction <= 1, "data.label_fraction", fraction, "a number in (0, 1]")
    _require(cfg.finetune.test_ckpt in TEST_CKPTS, "finetune.test_ckpt", cfg.finetune.test_ckpt,
             ", ".join(TEST_CKPTS))
    check_image_size(cfg)


def check_optim(cfg: DictConfig) -> None:
    lr = OmegaConf.select(cfg, "optim.optimizer.lr")
    _require(_number(lr) and math.isfinite(lr) and lr > 0, "optim.optimizer.lr", lr, "a finite number > 0")
    _non_negative(cfg, "optim.warmup")
    wd = OmegaConf.select(cfg, "optim.optimizer.weight_decay")
    _require(wd is None or (_number(wd) and wd >= 0), "optim.optimizer.weight_decay", wd, "a number >= 0")
    check_schedule(cfg.optim.get("schedule_interval", "step"), cfg.optim.get("cosine_period", "run"))


def check_loss(cfg: DictConfig) -> None:
    if cfg.loss.fn not in LOSSES:
        raise unknown("loss function", cfg.loss.fn, LOSSES)
    params = cfg.loss.get("params") or {}
    weights = {k: params[k] for k in ("alpha", "beta", "gamma") if k in params}
    for key, value in weights.items():
        _require(_number(value) and math.isfinite(value) and value >= 0, f"loss.params.{key}", value,
                 "a finite number >= 0")
    if weights and not any(weights.values()):
        raise UserError("loss weights alpha, beta and gamma are all 0: nothing to train; accepted: at "
                        "least one weight > 0")
    if "tau" in params:
        _positive(cfg, "loss.params.tau")
    variant = params.get("variant", CONTRASTIVE_VARIANTS[0])
    if variant not in CONTRASTIVE_VARIANTS:
        raise unknown("contrastive loss variant (loss.params.variant)", variant, CONTRASTIVE_VARIANTS)


def check_finetune(cfg: DictConfig) -> None:
    mode = cfg.finetune.mode
    _require(mode in FINETUNE_MODES, "finetune.mode", mode, ", ".join(FINETUNE_MODES))
    _positive(cfg, "finetune.knn_k", integer=True)
    _positive(cfg, "finetune.knn_temperature")


def check_evaluate(cfg: DictConfig) -> None:
    _require(cfg.suite in SUITES, "suite", cfg.suite, ", ".join(SUITES))
    stored_cells(cfg)  # a published benchmark's files: their layout, before any work
    accepted = distortions.families()  # without a severity axis: every family
    for family in cfg.families:
        if family not in accepted:
            raise unknown("evaluation family", family, accepted)
    _positive(cfg, "diagnostics.max_batches", integer=True)
    _non_negative(cfg, "memo_mib")
    _non_negative(cfg, "attention.num_images", integer=True)


def check_labelled_folder(cfg: DictConfig) -> None:
    """A fine-tune or evaluation on ``data=folder`` needs class folders, at least 2: refused
    before anything else (``init=auto`` would otherwise first look for a distilled student)."""
    path = cfg.data.get("path")
    if cfg.data.get("name") != "folder" or not path:
        return  # a hub dataset's labels are known once loaded: ImageDataModule.num_classes
    classes = owndata.folder_layout(path)
    if (err := owndata.unlabelled_error(path, "folder", classes, bool(classes))) is not None:
        raise err


def check_image_size(cfg: DictConfig) -> None:
    """The data's image size is the model's input size, and a whole number of patches."""
    size, model_size = cfg.data.get("image_size"), cfg.model.get("img_size")
    if size is None or model_size is None:
        return
    _require(_int(size) and size > 0, "data.image_size", size, "an integer > 0")
    _require(size == model_size, "data.image_size", size, f"model {cfg.model.name}'s input size {model_size}")
    kwargs = cfg.model.get("timm_kwargs") or {}
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans"):
        if key in kwargs:  # timm builds a depth-0 ViT without complaint; the taps then fail deep inside
            _require(_int(kwargs[key]) and kwargs[key] > 0, f"model.timm_kwargs.{key}", kwargs[key],
                     "an integer > 0")
    built = kwargs.get("img_size")
    _require(built is None or built == model_size, "model.timm_kwargs.img_size", built,
             f"model.img_size ({model_size})")
    patch = kwargs.get("patch_size") or _patch_from_name(cfg.model.name)
    if patch and size % patch:
        raise UserError(f"data.image_size={size} is not a multiple of model {cfg.model.name}'s patch size "
                        f"{patch}; accepted: a multiple of {patch}, e.g. {size - size % patch or patch}")


def _patch_from_name(name: str) -> int | None:
    """The patch size in a timm ViT name (``vit_base_patch16_224`` → 16); None for other models."""
    part = next((p for p in str(name).split("_") if p.startswith("patch")), None)
    digits = part[len("patch"):].split(".")[0] if part else ""
    return int(digits) if digits.isdigit() else None


def check_config(cfg: DictConfig, build_distortion) -> None:
    """Every value the task reads, before any work (``build_distortion`` checks the distortion)."""
    check_common(cfg)
    build_distortion(cfg.distortion)
    check_loss(cfg)  # finetune and evaluate name their upstream student by its loss
    task = cfg.task
    if task in ("distill", "finetune"):
        check_optim(cfg)
    if task in ("finetune", "evaluate"):
        check_finetune(cfg)
        check_labelled_folder(cfg)
    if task == "evaluate":
        check_evaluate(cfg)
