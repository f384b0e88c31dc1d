"""Every option of every config group resolves and builds, through the same factories the CLIs use.

Parametrised from the file listing of ``distortkd/conf``: a new YAML is tested without new test
code, and a new group fails ``test_every_group_has_a_builder`` until it gets one. An option that
cannot build here (hub-only weights or datasets, a GPU trainer without a GPU) must fail with the
one-line message the CLI prints, naming the bad value; nothing is skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf, open_dict

from distortkd import CONF, build, checks, cli
from distortkd.errors import UserError
from distortkd.sources import DATASETS, OWN
from distortkd.steps import distill_loss
from distortkd.training import make_loggers, make_trainer
from distortkd.vit import FrozenTeacher, ToTeacher

CONF_DIR = Path(CONF)
GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")
ENTRIES = ("distill", "finetune", "evaluate")
# Small, local and fast: the tiny random ViT, Fashion-MNIST's IDX files, a few images.
TINY = {"experiment": "test", "data": "fashion_mnist"}
SMALL = ["data.num_workers=0", "data.pin_memory=false", "data.batch_size=4", "data.eval_batch_size=4",
         "data.limit_train=8", "data.limit_eval=4"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _compose(entry: str, groups: dict[str, str], extra: list[str] = ()) -> object:
    overrides = [f"{g}={o}" for g, o in groups.items()] + SMALL + list(extra)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    return cfg


def _one_line_refusal(fn, *names: str) -> str:
    """Runs ``fn``, which must fail as the CLI would report it: one line naming ``names``."""
    with pytest.raises((UserError, InstantiationException)) as info:
        fn()
    message = cli._one_line(info.value)
    assert "\n" not in message and all(n in message for n in names), message
    return message


def _images(cfg, n: int = 4) -> torch.Tensor:
    size, chans = int(cfg.model.img_size), int(cfg.model.in_chans)
    return torch.rand(n, chans, size, size, generator=torch.Generator().manual_seed(0))


def _hub_weights(node) -> bool:
    return bool(node.get("pretrained")) and node.get("weights_file") is None


def _pair(cfg):
    """Student and frozen teacher as the distill CLI builds them."""
    student = build.build_model(cfg.model)
    teacher = build.build_teacher(cfg.get("teacher"), cfg.model, student)
    return student, teacher


# --- one builder per group ------------------------------------------------------------------------

def build_model_option(cfg, tmp_path: Path) -> None:
    if _hub_weights(cfg.model):
        _one_line_refusal(lambda: build.build_model(cfg.model), cfg.model.name, "weights_file")
        return
    encoder = build.build_model(cfg.model).eval()
    with torch.no_grad():
        out = encoder(_images(cfg, 2))
    assert out.shape == (2, encoder.embed_dim) and torch.isfinite(out).all()


def build_teacher_option(cfg, tmp_path: Path) -> None:
    if _hub_weights(cfg.teacher):
        _one_line_refusal(lambda: _pair(cfg), cfg.teacher.name, "weights_file")
        return
    student, teacher = _pair(cfg)
    build.check_teacher(student, teacher, cfg.loss, cfg.teacher.get("name") or cfg.model.name)
    out = distill_loss(student, FrozenTeacher(teacher), build.build_distortion(cfg.distortion),
                       build.build_loss(cfg.loss), _images(cfg),
                       to_teacher=ToTeacher.between(student, teacher))  # identity for the same width
    assert torch.isfinite(out["loss"])


def build_distortion_option(cfg, tmp_path: Path) -> None:
    distortion = build.build_distortion(cfg.distortion)
    x = _images(cfg)
    y = distortion(x, torch.arange(4))
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert torch.equal(y, distortion(x, torch.arange(4)))  # per-sample seeds: reproducible
    assert torch.equal(y, x) == (cfg.distortion.family == "identity")


def build_loss_option(cfg, tmp_path: Path) -> None:
    student, teacher = _pair(cfg)
    loss = build.build_loss(cfg.loss)
    with torch.no_grad():  # a different student, so that every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = distill_loss(student, FrozenTeacher(teacher), build.build_distortion(cfg.distortion), loss,
                       _images(cfg))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def build_optim_option(cfg, tmp_path: Path) -> None:
    checks.check_optim(cfg)
    encoder = build.build_model(cfg.model)
    optimizer = instantiate(cfg.optim.optimizer)(encoder.parameters())
    before = [p.detach().clone() for p in encoder.parameters()]
    encoder(_images(cfg)).pow(2).mean().backward()
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, encoder.parameters(), strict=True))


def _write_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                PIL.Image.fromarray(pixels).save(root / split / c / f"{k}.png")
    return root


def _write_hub_copy(root: Path) -> Path:
    import datasets

    rng = np.random.default_rng(0)
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})

    def split(n):
        images = [PIL.Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=feats)

    datasets.DatasetDict({"train": split(12), "test": split(4)}).save_to_disk(str(root))
    return root


def build_data_option(cfg, tmp_path: Path) -> None:
    with open_dict(cfg):
        cfg.data.cache_dir = str(tmp_path / "hf")  # an empty cache: hub-only data cannot load
        if cfg.data.name == "folder":
            cfg.data.path = str(_write_folder(tmp_path / "folder"))
        elif cfg.data.name == "hub":
            cfg.data.path = str(_write_hub_copy(tmp_path / "hub"))
    local = cfg.data.path is not None or cfg.data.name == "fashion_mnist"

    def first_batch():
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    if not local:
        _one_line_refusal(first_batch, repr(cfg.data.name), "data.path")
        return
    dm, batch = first_batch()
    size, chans = int(cfg.data.image_size), int(cfg.data.in_chans)
    assert batch["image"].shape == (4, chans, size, size) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert ((0 <= batch["label"]) & (batch["label"] < dm.num_classes)).all()


def build_trainer_option(cfg, tmp_path: Path) -> None:
    def make():
        return make_trainer(cfg, tmp_path / "run", monitor="val/loss", mode="min")

    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        message = _one_line_refusal(make, "cannot build lightning.pytorch.")
        assert "gpu" in message.lower(), message
        return
    trainer = make()
    assert trainer.max_epochs == cfg.trainer.max_epochs
    assert type(trainer.accelerator).__name__.lower().startswith(cfg.trainer.accelerator[:3])


def build_logger_option(cfg, tmp_path: Path) -> None:
    loggers = make_loggers(cfg, tmp_path)
    kinds = {"none": [], "csv": ["ResumableCSVLogger"], "wandb": ["ResumableCSVLogger", "WandbLogger"]}
    assert [type(lg).__name__ for lg in loggers] == kinds[cfg.logger.kind]
    for logger in loggers:
        logger.log_metrics({"train/loss": 1.0}, step=0)
        logger.finalize("success")
    assert bool(loggers) == (tmp_path / "csv" / "metrics.csv").is_file()


BUILDERS = {"model": build_model_option, "teacher": build_teacher_option,
            "distortion": build_distortion_option, "loss": build_loss_option,
            "optim": build_optim_option, "data": build_data_option,
            "trainer": build_trainer_option, "logger": build_logger_option}


def test_every_group_has_a_builder():
    assert set(GROUPS) == {*BUILDERS, "experiment"}, "a new config group needs a builder here"


def test_every_registered_dataset_has_a_data_config_and_back():
    """A ``DATASETS`` entry is reachable (and so built above) only through its ``conf/data`` file;
    a data config names a registered dataset or the user's own data."""
    assert set(options("data")) == {*DATASETS, *OWN}
    for option in options("data"):
        assert OmegaConf.load(CONF_DIR / "data" / f"{option}.yaml").name == option


@pytest.mark.parametrize("group, option", [(g, o) for g in BUILDERS for o in options(g)])
def test_every_option_resolves_and_builds(group, option, tmp_path):
    cfg = _compose("distill", {**TINY, group: option})
    assert cfg[group] is not None
    BUILDERS[group](cfg, tmp_path)


# --- experiments: each entry point, every sweep cell, one distillation step -------------------------

def _sweep(experiment: str, entry: str) -> dict[str, list[str]]:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    return {k: str(v).split(",") for k, v in params.items()}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_builds_a_step_in_every_entry_point(experiment, entry, tmp_path):
    """The experiment's own settings on the tiny model and local data: the CLI's checks pass, and
    its distortion and loss run one distillation step; every sweep value composes and checks too."""
    tiny = ["model=vit_tiny_test", "trainer=cpu", "data=fashion_mnist", "model.weights_file=null",
            "data.train_subset=null"]
    cfg = _compose(entry, {"experiment": experiment}, tiny)
    assert cfg.task == entry and cfg.run_name
    checks.check_config(cfg, build.build_distortion)
    student, teacher = _pair(cfg)
    out = distill_loss(student, FrozenTeacher(teacher), build.build_distortion(cfg.distortion),
                       build.build_loss(cfg.loss), _images(cfg))
    assert torch.isfinite(out["loss"])
    for key, values in _sweep(experiment, entry).items():
        group_override = key in GROUPS
        for value in values:
            if group_override:
                assert value in options(key), f"{experiment}: sweep {key}={value} has no conf/{key}/{value}.yaml"
                if key == "data":
                    continue  # a hub dataset's cell: built (refused offline) by the data group test
            cell = _compose(entry, {"experiment": experiment},
                            [*(t for t in tiny if not t.startswith(f"{key}=")), f"{key}={value}"])
            checks.check_config(cell, build.build_distortion)


@pytest.mark.parametrize("launcher", options("hydra/launcher"))
def test_every_launcher_names_an_importable_launcher(launcher):
    """``hydra/launcher`` options: Hydra builds them; their ``_target_`` class must exist."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[f"hydra/launcher={launcher}"],
                      return_hydra_config=True)
    assert get_class(cfg.hydra.launcher._target_).__name__.endswith("Launcher")
