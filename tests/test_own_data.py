"""The user's own data: ``data=folder`` (an image folder) and ``data=hub`` (any hub image-
classification dataset, here as local copies and a monkeypatched ``load_dataset``), through the
real ``distortkd/conf/data/folder.yaml`` and ``hub.yaml``; nothing is downloaded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from hydra.utils import instantiate
from omegaconf import OmegaConf

import distortkd
from distortkd.data import ImageDataModule
from distortkd.errors import UserError

CONF = Path(distortkd.CONF) / "data"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
KW = {"num_workers": 0, "pin_memory": False, "batch_size": 8}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def png(value: int, size: int = 20, mode: str = "RGB") -> bytes:
    """A PNG whose every pixel is ``value``: a batch's pixels tell which file it came from."""
    buf = io.BytesIO()
    PIL.Image.new(mode, (size, size), (value,) * 3 if mode == "RGB" else value).save(buf, "PNG")
    return buf.getvalue()


def write_tree(root: Path, layout: dict[str, int], size: int = 20) -> dict[Path, int]:
    """Writes ``{relative folder: image count}``; returns each file's pixel value (unique)."""
    values, value = {}, 0
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            value += 1
            path = root / folder / f"img{value:03d}.png"
            path.write_bytes(png(value, size))
            values[path] = value
    return values


def module(kind: str, tmp_path: Path, **overrides):
    """The real ``distortkd/conf/data/<kind>.yaml`` under a minimal root config, instantiated."""
    root = OmegaConf.create({"model": {"img_size": 32, "crop_pct": 0.875, "in_chans": 3},
                             "seed": 0, "data": OmegaConf.load(CONF / f"{kind}.yaml")})
    args = {**KW, "cache_dir": str(tmp_path / "cache"), "augment": False}
    return instantiate(root.data, **{**args, **overrides})


def rows(dm, role: str) -> tuple[list[int], list[int], list[int]]:
    """(index, label, pixel value) of every image of ``role``, from its real batches."""
    batches = list(dm._loader(role))
    for b in batches:
        assert b["image"].shape[1:] == (3, 32, 32) and b["image"].dtype == torch.float32
    pixel = [round(float(v) * 255) for b in batches for v in b["image"][:, 0, 16, 16]]
    index = [int(i) for b in batches for i in b["index"]]
    return index, [int(v) for b in batches for v in b["label"]], pixel


CLASSES = ["zebra", "ant", "moose"]  # written in this order; labels follow the sorted order


def test_folder_classes_are_sorted_and_val_is_a_stratified_seeded_part_of_train(tmp_path, caplog):
    values = write_tree(tmp_path / "d", {f"train/{c}": 8 for c in CLASSES})
    label_of = {v: sorted(CLASSES).index(p.parent.name) for p, v in values.items()}
    dm = module("folder", tmp_path, path=str(tmp_path / "d"), val_fraction=0.25)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == sorted(CLASSES)
    train, val = rows(dm, "train"), rows(dm, "val")
    for _, labels, pixels in (train, val):
        assert labels == [label_of[p] for p in pixels]  # label = sorted index of the class folder
    assert not set(train[0]) & set(val[0]) and len(train[0]) + len(val[0]) == 24
    assert np.bincount(val[1]).tolist() == [2, 2, 2]  # stratified: a quarter of each class
    again = module("folder", tmp_path, path=str(tmp_path / "d"), val_fraction=0.25)
    other = module("folder", tmp_path, path=str(tmp_path / "d"), val_fraction=0.25, seed=1)
    assert rows(again, "val")[0] == val[0] and rows(other, "val")[0] != val[0]
    dm.setup("test")  # no test/ folder: the test role is the val split, and a warning says so
    assert rows(dm, "test")[0] == val[0] and "no test split" in caplog.text


def test_folder_val_and_test_folders_are_used_as_they_are(tmp_path):
    values = write_tree(tmp_path / "d", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 1,
                                         "test/a": 1, "test/b": 3})
    split_of = {v: p.parent.parent.name for p, v in values.items()}
    dm = module("folder", tmp_path, path=str(tmp_path / "d"))  # val_fraction 0.1: unused
    dm.setup("fit")
    dm.setup("test")
    for role, split, n in (("train", "train", 8), ("val", "val", 3), ("test", "test", 4)):
        _, labels, pixels = rows(dm, role)
        assert len(pixels) == n and {split_of[p] for p in pixels} == {split}
    assert rows(dm, "test")[1] == [0, 1, 1, 1]


def test_class_folders_without_a_train_folder_are_the_train_split(tmp_path):
    values = write_tree(tmp_path / "d", {c: 5 for c in CLASSES})
    dm = module("folder", tmp_path, path=str(tmp_path / "d"), val_fraction=0.2)
    dm.setup("fit")
    _, labels, pixels = rows(dm, "train")
    label_of = {v: sorted(CLASSES).index(p.parent.name) for p, v in values.items()}
    assert len(pixels) == 12 and labels == [label_of[p] for p in pixels]


def test_folder_label_fraction_is_stratified(tmp_path):
    write_tree(tmp_path / "d", {f"train/{c}": 10 for c in CLASSES})
    dm = module("folder", tmp_path, path=str(tmp_path / "d"), val_fraction=0.2,
                label_fraction=0.25)
    dm.setup("fit")
    assert np.bincount(rows(dm, "train")[1]).tolist() == [2, 2, 2]  # 8 train per class -> 2


@pytest.mark.parametrize("layout", ["train/*.png", "*.png"])
def test_unlabelled_folder_serves_distillation_and_refuses_a_fine_tune(tmp_path, layout):
    folder = "train" if layout.startswith("train") else "."
    write_tree(tmp_path / "d", {folder: 20})
    dm = module("folder", tmp_path, path=str(tmp_path / "d"))
    dm.setup("fit")
    index, labels, pixels = rows(dm, "train")
    assert len(index) == 18 and len(rows(dm, "val")[0]) == 2 and set(labels) == {-1}
    with pytest.raises(UserError, match="no class folders .* no labels") as err:
        _ = dm.num_classes
    assert "\n" not in str(err.value)


def write_bad(root: Path, case: str) -> None:
    if case == "missing":
        return
    root.mkdir()
    if case == "class folder without images":
        write_tree(root, {"train/a": 2, "train/b": 0})
        (root / "train" / "b" / "notes.txt").write_text("no image here")
    elif case == "images next to class folders":
        write_tree(root, {"train/a": 2, "train": 1})
    elif case == "val class not in train":
        write_tree(root, {"train/a": 2, "train/b": 2, "val/c": 1})
    elif case == "val without train":
        write_tree(root, {"val/a": 2})


@pytest.mark.parametrize("case, message", [
    ("missing", "data.path '.*/d' does not exist"),
    ("empty", "d holds no images"),
    ("class folder without images", "class folder '.*/train/b' holds no images"),
    ("images next to class folders", "holds both images and sub-folders"),
    ("val class not in train", "class folder 'c' is not a train class; train classes: a, b"),
    ("val without train", "has val but no train/ folder"),
])
def test_bad_folder_is_a_one_line_error(tmp_path, case, message):
    write_bad(tmp_path / "d", case)
    dm = module("folder", tmp_path, path=str(tmp_path / "d"))
    with pytest.raises(UserError, match=message) as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)


def test_one_class_is_refused_for_a_fine_tune_and_a_folder_is_required(tmp_path):
    write_tree(tmp_path / "d", {"train/only": 10})
    dm = module("folder", tmp_path, path=str(tmp_path / "d"))
    dm.setup("fit")
    assert len(rows(dm, "train")[0]) == 9  # distillation would run
    with pytest.raises(UserError, match="has 1 class \\(only\\); .* at least 2 classes"):
        _ = dm.num_classes
    with pytest.raises(UserError, match="data=folder needs data.path"):
        ImageDataModule("folder")


def test_corrupt_file_in_a_folder_is_skipped_and_counted(tmp_path):
    values = write_tree(tmp_path / "d", {"train/a": 10, "train/b": 10})
    bad = next(p for p in values if p.parent.name == "b")
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    dm = module("folder", tmp_path, path=str(tmp_path / "d"), max_bad_fraction=0.2)
    dm.setup("fit")
    seen = rows(dm, "train")[2] + rows(dm, "val")[2]
    assert len(seen) == 19 and values[bad] not in seen
    assert sum(dm.skipped.values()) == 1


# --- data=hub: any hub image-classification dataset, here local copies in the hub layout. ---

def hub_copy(n_per_class: int = 6, splits=("train", "valid"), names=("cat", "dog", "fox"),
             extra: dict | None = None, corrupt: int | None = None) -> DatasetDict:
    """Columns named unlike any built-in dataset: ``picture`` (Image), ``category`` (ClassLabel);
    the first split's row ``corrupt`` a truncated PNG."""
    out, value = {}, 0
    for split in splits:
        labels = [c for c in range(len(names)) for _ in range(n_per_class)]
        pics = []
        for _ in labels:
            value += 1
            cut = len(pics) == corrupt and split == splits[0]
            pics.append({"bytes": png(value)[:40] if cut else png(value), "path": None})
        cols = {"picture": pics, "category": labels, **(extra or {})}
        feats = {"picture": Image(), "category": ClassLabel(names=list(names))}
        feats.update({k: Value("int64") for k in extra or {}})
        out[split] = Dataset.from_dict(cols, features=Features(feats))
    return DatasetDict(out)


@pytest.mark.parametrize("how", ["disk", "parquet"])
def test_hub_columns_splits_and_classes_come_from_the_features(tmp_path, how):
    dd, path = hub_copy(), tmp_path / "copy"
    if how == "disk":
        dd.save_to_disk(str(path))
    for split, ds in dd.items() if how == "parquet" else ():
        ds.to_parquet(str(path / "data" / f"{split}-00000-of-00001.parquet"))
    dm = module("hub", tmp_path, path=str(path))
    dm.setup("fit")
    dm.setup("test")
    assert dm.spec.image_key == "picture" and dm.spec.label_key == "category"
    assert dm.num_classes == 3 and dm.class_names == ["cat", "dog", "fox"]
    assert dm.spec.splits == {"train": "train", "val": "valid"} and dm.spec.small
    index, labels, pixels = rows(dm, "val")
    assert len(index) == 18 and labels == np.asarray(dd["valid"]["category"])[index].tolist()
    assert pixels == [18 + i + 1 for i in index]  # the valid split's own rows, not carved train
    assert rows(dm, "test")[0] == index  # no test split: the test role is the val split


@pytest.mark.parametrize("override, message", [
    ({"image_column": "img"}, "unknown column of .* \\(data.image_column\\) 'img'; accepted: "
                              "category, picture, weight"),
    ({"label_column": "label"}, "unknown column of .* \\(data.label_column\\) 'label'; "
                                "accepted: category, picture, weight"),
    ({"splits": {"val": "validation"}}, "unknown split of .* \\(data.splits.val\\) "
                                        "'validation'; accepted: train, valid"),
    ({"label_column": "weight"}, "has 1 class"),
])
def test_hub_wrong_names_are_one_line_errors_listing_what_exists(tmp_path, override, message):
    hub_copy(extra={"weight": [0] * 18}).save_to_disk(str(tmp_path / "copy"))
    dm = module("hub", tmp_path, path=str(tmp_path / "copy"), **override)
    with pytest.raises(UserError, match=message) as err:
        dm.setup("fit")
        _ = dm.num_classes
    assert "\n" not in str(err.value)


def test_hub_copy_keeps_label_fraction_stratified_and_skips_a_corrupt_image(tmp_path):
    hub_copy(n_per_class=12, splits=("train",), corrupt=5).save_to_disk(str(tmp_path / "copy"))
    dm = module("hub", tmp_path, path=str(tmp_path / "copy"), val_fraction=0.25,
                label_fraction=0.5, max_bad_fraction=0.2)
    dm.setup("fit")
    index, labels, _ = rows(dm, "train")
    in_train = int(5 in dm.dataset("train").index)  # row 5: class 0, corrupt
    assert len(dm.dataset("train")) == 15  # 9 train per class -> round(4.5) = 5 each
    assert np.bincount(labels).tolist() == [5 - in_train, 5, 5]
    rows(dm, "val")
    assert 5 not in index and dm.skipped == {"train": in_train, "val": 1 - in_train}


def test_hub_with_two_class_label_columns_asks_which(tmp_path):
    dd = hub_copy(extra={"coarse": [c // 2 for c in range(18)]})
    dd.cast_column("coarse", ClassLabel(num_classes=9)).save_to_disk(str(tmp_path / "copy"))
    with pytest.raises(UserError, match="several ClassLabel columns \\(category, coarse\\); set "
                                        "data.label_column"):
        module("hub", tmp_path, path=str(tmp_path / "copy")).setup("fit")
    dm = module("hub", tmp_path, path=str(tmp_path / "copy"), label_column="coarse")
    dm.setup("fit")
    assert dm.num_classes == 9 and dm.spec.label_key == "coarse"


def test_hub_integer_labels_and_column_overrides(tmp_path):
    dd = hub_copy(splits=("train", "test"))
    dd = dd.cast_column("category", Value("int64")).rename_column("category", "y")
    dd.save_to_disk(str(tmp_path / "copy"))
    with pytest.raises(UserError, match="no val split and data.val_fraction is null"):
        module("hub", tmp_path, path=str(tmp_path / "copy"), val_fraction=None).setup("fit")
    dm = module("hub", tmp_path, path=str(tmp_path / "copy"), label_column="y", val_fraction=0.5)
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names is None  # largest label + 1, no names
    assert np.bincount(rows(dm, "val")[1]).tolist() == [3, 3, 3]


def test_hub_id_loads_every_split_with_load_dataset(tmp_path, monkeypatch):
    local, calls = hub_copy(splits=("train", "validation", "test")), []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return local if split is None else local[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = module("hub", tmp_path, hub_id="someone/pets")
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert calls == [("someone/pets", None)]  # once, all splits: their names come from it
    assert dm.spec.splits == {"train": "train", "val": "validation", "test": "test"}
    assert len(rows(dm, "test")[0]) == 18 and dm.num_classes == 3
    with pytest.raises(UserError, match="data=hub needs data.hub_id"):
        ImageDataModule("hub")


# --- End to end through the real CLIs. ---

def cli(task: str, root: Path, *overrides: str) -> dict:
    env = {**os.environ, "DISTORTKD_RUNS": str(root), "CI": "1"}
    exe = Path(sys.executable).parent / f"distortkd-{task}"
    proc = subprocess.run([str(exe), "experiment=test", "data=folder", "data.num_workers=0",
                           "data.batch_size=16", *overrides], env=env, capture_output=True,
                          text=True, timeout=600)
    (run,) = list((root / "test" / task).iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    return {"rc": proc.returncode, "stderr": proc.stderr, **metrics}


@pytest.mark.slow
def test_distill_on_unlabelled_then_fine_tune_on_labelled_folder(tmp_path):
    write_tree(tmp_path / "raw", {"train": 48}, size=40)
    write_tree(tmp_path / "lab", {f"train/{c}": 16 for c in CLASSES} | {"test/ant": 4,
                                                                        "test/moose": 4})
    root = tmp_path / "runs"
    # refused before it looks for a distilled student (init=auto) or writes anything
    refused = subprocess.run([str(Path(sys.executable).parent / "distortkd-finetune"),
                              "experiment=test", "data=folder", f"data.path={tmp_path / 'raw'}"],
                             env={**os.environ, "DISTORTKD_RUNS": str(tmp_path / "refused")},
                             capture_output=True,
                             text=True, timeout=300)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith("error: ") and "no class folders" in last
    (run,) = list((tmp_path / "refused" / "test" / "finetune").iterdir())  # made by Hydra
    assert not (run / "metrics.json").exists() and not (run / "config.yaml").exists()
    distilled = cli("distill", root, f"data.path={tmp_path / 'raw'}", "data.limit_train=32")
    assert distilled["rc"] == 0 and distilled["status"] == "ok", distilled["stderr"][-2000:]
    tuned = cli("finetune", root, f"data.path={tmp_path / 'lab'}", "data.label_fraction=0.25")
    assert tuned["rc"] == 0 and tuned["status"] == "ok", tuned["stderr"][-2000:]
    assert tuned["config"]["provenance"]["init"]["path"].startswith(str(root / "test" / "distill"))


def fashion_mnist_tree(root: Path, per_class: int) -> None:
    """Real Fashion-MNIST written out as ``train/<class>/*.png`` and ``test/<class>/*.png``."""
    from distortkd.sources import DATASETS, read_idx_split

    names = [n.replace("/", "-") for n in DATASETS["fashion_mnist"].names]
    for split, k in (("train", per_class), ("test", per_class // 3)):
        images, labels = read_idx_split(FMNIST, split)
        for c, name in enumerate(names):
            (root / split / name).mkdir(parents=True)
            for i in np.flatnonzero(labels == c)[:k]:
                PIL.Image.fromarray(images[i]).save(root / split / name / f"{i}.png")


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist not installed")
def test_fine_tune_on_real_fashion_mnist_png_folder(tmp_path):
    fashion_mnist_tree(tmp_path / "fm", per_class=60)  # 600 train (120 of them val), 200 test
    tuned = cli("finetune", tmp_path / "runs", f"data.path={tmp_path / 'fm'}", "init=pretrained",
                "distortion=clean", "data.val_fraction=0.2", "trainer.max_epochs=15",
                "optim.optimizer.lr=1e-3", "data.eval_batch_size=64")
    assert tuned["rc"] == 0 and tuned["status"] == "ok", tuned["stderr"][-2000:]
    print(f"fashion-mnist png folder: test/acc1 {tuned['test/acc1']:.3f}")
    assert tuned["test/acc1"] > 0.3  # 10 classes: chance is 0.1
