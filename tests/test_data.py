"""The datamodule on tiny local copies in each dataset's exact hub schema, generated here (nothing
is downloaded), and on Debian's real Fashion-MNIST files."""

from __future__ import annotations

import gzip
import io
import re
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distortkd import cli, imagesets, sources, transforms
from distortkd.data import ImageDataModule
from distortkd.errors import UserError
from distortkd.sources import DATASETS
from distortkd.transforms import resized_crop

CONF = Path(cli.CONF) / "data"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CMC = (Path(sources.__file__).parent / "imagenet100_classes.txt").read_text().split()
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]
KW = {"num_workers": 0, "pin_memory": False}

# name: image size (h, w), PIL mode, {split: images per class}, how it is written to disk.
SCHEMA = {
    "imagenet100": ((60, 80), "RGB", {"train": 1, "validation": 1}, "parquet:data"),
    "cifar10": ((32, 32), "RGB", {"train": None, "test": 1}, "parquet:plain_text"),
    "cifar100": ((32, 32), "RGB", {"train": 1, "test": 1}, "disk"),
    "stl10": ((96, 96), "RGB", {"train": 2, "test": 1}, "parquet:data"),
    "resisc45": ((256, 256), "RGB", {"train": 1, "validation": 1, "test": 1}, "disk"),
    "camelyon17": ((96, 96), "RGB", {"train": 4, "validation": 8, "test": 4}, "parquet:data"),
    "fashion_mnist": ((28, 28), "L", {"train": 3, "test": 1}, "parquet:fashion_mnist"),
}
CENTERS = {"train": [0, 3, 4], "validation": [0, 3, 4, 1], "test": [2]}  # CAMELYON17 hospitals


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = PIL.Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format=fmt)
    return buf.getvalue()


def hub_split(name: str, split: str, per_class: int | None, rng) -> Dataset:
    """A split in ``name``'s hub schema: image/label columns, ClassLabel, realistic image size."""
    spec, ((h, w), mode, _, _) = DATASETS[name], SCHEMA[name]
    n = spec.num_classes
    counts = [4 + c % 3 for c in range(n)] if per_class is None else [per_class] * n  # min 4
    labels = [c for c in range(n) for _ in range(counts[c])]
    shape = (h, w) if mode == "L" else (h, w, 3)
    fmt = "JPEG" if name in ("imagenet100", "resisc45") else "PNG"
    images = [{"bytes": encode(rng.integers(0, 256, shape, np.uint8), fmt), "path": None}
              for _ in labels]
    cols = {spec.image_key: images, spec.label_key: labels}
    names = CIFAR10_NAMES if name == "cifar10" else [f"class {c}" for c in range(n)]
    feats = {spec.image_key: Image(), spec.label_key: ClassLabel(names=names)}
    if name == "cifar100":
        cols["coarse_label"] = [c // 5 for c in labels]
        feats["coarse_label"] = ClassLabel(num_classes=20)
    if name == "camelyon17":
        centers = CENTERS[split]
        cols["center"] = [centers[i % len(centers)] for i in range(len(labels))]
        feats["center"] = Value("int32")
    return Dataset.from_dict(cols, features=Features(feats))


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    """A tiny local copy of every dataset, as parquet shards in the hub layout or save_to_disk."""
    root, rng, out = tmp_path_factory.mktemp("copies"), np.random.default_rng(0), {}
    for name, (_, _, splits, how) in SCHEMA.items():
        dd = DatasetDict({s: hub_split(name, s, k, rng) for s, k in splits.items()})
        out[name] = root / name
        if how == "disk":
            dd.save_to_disk(str(out[name]))
        for split, ds in dd.items() if how != "disk" else ():
            ds.to_parquet(str(out[name] / how.split(":")[1] / f"{split}-00000-of-00001.parquet"))
    return out


def from_config(name: str, tmp_path: Path, **overrides) -> ImageDataModule:
    """Instantiates the real ``conf/data/<name>.yaml`` under a minimal root config."""
    root = OmegaConf.create({"model": {"img_size": 32, "crop_pct": 0.875, "in_chans": 3}, "seed": 0,
                             "data": OmegaConf.load(CONF / f"{name}.yaml")})
    args = {**KW, "batch_size": 8, "cache_dir": str(tmp_path / "cache")}
    return instantiate(root.data, **{**args, **overrides})


def check_batch(batch: dict, dm: ImageDataModule, size: int = 32, chans: int = 3) -> None:
    assert set(batch) == {"image", "label", "index"}
    b = len(batch["label"])
    assert b > 0 and batch["image"].shape == (b, chans, size, size)
    assert batch["image"].dtype == torch.float32 and batch["label"].dtype == torch.int64
    assert batch["index"].dtype == torch.int64
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1 and batch["image"].std() > 0
    assert 0 <= batch["label"].min() and batch["label"].max() < dm.num_classes


@pytest.mark.parametrize("name", list(SCHEMA))
def test_every_config_loads_a_local_copy(name, copies, tmp_path):
    dm = from_config(name, tmp_path, path=str(copies[name]))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == DATASETS[name].num_classes and len(dm.class_names) == dm.num_classes
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        for batch in batches:
            check_batch(batch, dm)
        index = torch.cat([b["index"] for b in batches])
        assert len(index) == len(loader.dataset) == len(set(index.tolist()))  # every row once
    if name == "fashion_mnist":
        assert isinstance(dm.dataset("train"), imagesets.TensorImages)  # held in memory by default


@pytest.mark.parametrize("in_memory", [False, True])
def test_labels_and_index_point_at_the_same_row(copies, tmp_path, in_memory):
    dm = from_config("stl10", tmp_path, path=str(copies["stl10"]), augment=False, image_size=96,
                     in_memory=in_memory)
    raw = datasets.load_dataset(str(copies["stl10"]), cache_dir=str(tmp_path / "c2"))["train"]
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(dm.dataset("train"), imagesets.TensorImages if in_memory else imagesets.HFImages)
    for image, label, i in zip(batch["image"], batch["label"], batch["index"], strict=True):
        assert label == raw[int(i)]["label"]
        expected = torch.from_numpy(np.array(raw[int(i)]["image"])).permute(2, 0, 1) / 255
        assert torch.allclose(image, expected, atol=1e-6)  # eval at native size is the identity


def test_label_fraction_is_stratified_and_seeded(copies, tmp_path):
    def train_rows(seed):
        dm = from_config("cifar10", tmp_path, path=str(copies["cifar10"]), label_fraction=0.5,
                         seed=seed)
        dm.setup("fit")
        ds = dm.dataset("train")
        return ds.index, ds.labels[ds.index]

    index, labels = train_rows(0)
    counts = np.bincount(labels, minlength=10)
    assert counts.tolist() == [np.floor((4 + c % 3) * 0.5 + 0.5) for c in range(10)]  # half up
    assert np.array_equal(train_rows(0)[0], index) and not np.array_equal(train_rows(1)[0], index)


def test_label_fraction_that_empties_a_class_names_the_smallest_class(copies, tmp_path):
    dm = from_config("cifar10", tmp_path, path=str(copies["cifar10"]), label_fraction=0.1)
    with pytest.raises(UserError, match=r"label_fraction 0\.1 .*smallest class has 4 images"):
        dm.setup("fit")


def test_subset_fraction_and_limits_compose_on_original_indices():
    kw = dict(image_size=28, in_chans=1, **KW)
    dm = ImageDataModule("fashion_mnist", train_subset=[20000, 60000], label_fraction=0.1, seed=3,
                         **kw)
    train = dm.dataset("train")
    labels = sources.read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    counts = np.bincount(labels[20000:], minlength=10)
    assert train.index.min() >= 20000 and np.array_equal(
        np.bincount(labels[train.index.numpy()], minlength=10), np.floor(counts * 0.1 + 0.5))
    small = ImageDataModule("fashion_mnist", train_subset=[20000, 60000], label_fraction=0.1,
                            limit_train=100, limit_eval=50, seed=3, **kw)
    assert len(small.dataset("train")) == 100 and set(small.dataset("train").index.tolist()) <= set(
        train.index.tolist())
    other = ImageDataModule("fashion_mnist", limit_eval=50, seed=4, **kw)
    assert torch.equal(small.dataset("val").index, other.dataset("val").index)  # eval subset fixed
    with pytest.raises(UserError, match="train_subset .* 60000 rows"):
        ImageDataModule("fashion_mnist", train_subset=[0, 70000], **kw).dataset("train")


def test_val_fraction_is_carved_from_train_stratified_disjoint_and_seeded():
    kw = dict(image_size=28, in_chans=1, train_subset=[20000, 60000], val_fraction=0.05, **KW)
    labels = sources.read_idx(FMNIST / "train-labels-idx1-ubyte.gz")

    def rows(seed, **extra):
        dm = ImageDataModule("fashion_mnist", seed=seed, **kw, **extra)
        return {role: dm.dataset(role).index.numpy() for role in ("train", "val", "test")}

    full, labelled = rows(3), rows(3, label_fraction=0.01)
    val = full["val"]
    assert np.array_equal(labelled["val"], val)  # label_fraction applies after the carve
    assert val.min() >= 20000 and not set(val) & set(full["train"])  # from train, disjoint
    assert np.array_equal(np.sort(np.concatenate([val, full["train"]])), np.arange(20000, 60000))
    assert set(labelled["train"]) <= set(full["train"]) and len(labelled["train"]) == 380
    counts = np.bincount(labels[20000:], minlength=10)
    assert np.array_equal(np.bincount(labels[val], minlength=10), np.floor(counts * 0.05 + 0.5))
    assert len(full["test"]) == 10000  # the test split is untouched
    assert np.array_equal(rows(3)["val"], val) and not np.array_equal(rows(4)["val"], val)


@pytest.mark.parametrize("fraction, message", [
    (0.0, r"invalid data option val_fraction 0\.0; accepted: 0 < f < 1, or null"),
    (1.0, r"invalid data option val_fraction 1\.0; accepted: 0 < f < 1, or null"),
    (0.1, r"^val_fraction 0\.1 leaves a class without .*smallest class has 4 images; accepted: "
          r"val_fraction >= 0\.125$"),
    (0.9, r"^val_fraction 0\.9 leaves a class without train images: .*smallest class has 4 "
          r"images; accepted: val_fraction <= 0\.875$"),
])
def test_val_fraction_out_of_range_or_emptying_a_class_is_one_line(copies, tmp_path, fraction,
                                                                      message):
    with pytest.raises(UserError, match=message) as err:
        ImageDataModule("cifar10", path=str(copies["cifar10"]), val_fraction=fraction,
                        cache_dir=str(tmp_path / "cache"), **KW).setup("fit")
    assert "\n" not in str(err.value)


def write_jpeg_tree(root: Path, wnids: list[str], rng) -> None:
    for split in ("train", "val"):
        for w in wnids:
            (root / split / w).mkdir(parents=True)
            for k in range(2):
                (root / split / w / f"{w}_{k}.JPEG").write_bytes(
                    encode(rng.integers(0, 256, (40, 50, 3), np.uint8), "JPEG"))


def test_imagenet100_class_list_and_image_folder_use_cmc_order(tmp_path):
    assert len(CMC) == len(set(CMC)) == 100 and CMC[:3] == ["n02869837", "n01749939", "n02488291"]
    wnids = ["n02869837", "n01749939", "n02488291", "n02090622"]  # sorted order would be 3, 0, 2, 1
    root = tmp_path / "in100"
    write_jpeg_tree(root, wnids, np.random.default_rng(0))
    # real ImageNet holds some grayscale and CMYK JPEGs, and PNGs with alpha: all come out RGB
    gray = root / "train" / wnids[0] / f"{wnids[0]}_0.JPEG"
    gray.write_bytes(encode(np.zeros((40, 50), np.uint8), "JPEG"))
    cmyk = root / "train" / wnids[1] / f"{wnids[1]}_0.JPEG"
    cmyk.write_bytes(encode(np.zeros((40, 50, 3), np.uint8), "JPEG", mode="CMYK"))
    rgba = root / "train" / wnids[2] / "alpha.png"
    rgba.write_bytes(encode(np.full((40, 50, 4), 128, np.uint8), "PNG"))
    dm = ImageDataModule("imagenet100", path=str(root), image_size=32,
                         cache_dir=str(tmp_path / "cache"), **KW)
    dm.setup("fit")
    assert dm.class_names == CMC and dm.num_classes == 100
    for batch in dm.train_dataloader():
        check_batch(batch, dm)
        paths = [dm.dataset("train").table[int(i)]["image"]["path"] for i in batch["index"]]
        assert batch["label"].tolist() == [CMC.index(Path(p).parent.name) for p in paths]
    assert len(dm.dataset("val")) == 8  # the val/ folder became the validation split


def test_image_folder_with_unknown_wnid_is_refused(tmp_path):
    write_jpeg_tree(tmp_path / "in", ["n02869837", "n01440764"], np.random.default_rng(0))
    dm = ImageDataModule("imagenet100", path=str(tmp_path / "in"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="n01440764"):
        dm.setup("fit")


def test_camelyon17_ood_split_is_hospital_1_only(copies, tmp_path):
    dm = from_config("camelyon17", tmp_path, path=str(copies["camelyon17"]), val_ood=True)
    dm.setup("fit")
    val, ood = dm.val_dataloader()
    raw = datasets.load_dataset(str(copies["camelyon17"]), cache_dir=str(tmp_path / "c2"))
    centers = np.asarray(raw["validation"]["center"])
    ood_index = torch.cat([b["index"] for b in ood]).numpy()
    val_index = torch.cat([b["index"] for b in val]).numpy()
    assert (centers[ood_index] == 1).all() and len(ood_index) == (centers == 1).sum()
    assert (centers[val_index] != 1).all() and len(val_index) == (centers != 1).sum()
    assert len(dm.ood_dataloader().dataset) == len(ood_index)
    with pytest.raises(UserError, match="val_ood .* camelyon17"):
        ImageDataModule("cifar10", val_ood=True)


@pytest.mark.parametrize("how", ["env", "no network"])
def test_offline_without_local_copy_fails_at_once_in_one_line(tmp_path, monkeypatch, how):
    if how == "no network":  # flags unset (as if set after import) and the hub unreachable
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            monkeypatch.delenv(key)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(sources, "_hub_unreachable", lambda: True)
    dm = ImageDataModule("cifar10", cache_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        dm.prepare_data()
    assert time.perf_counter() - start < 15  # not the minutes of network retries
    message = str(err.value)
    assert "\n" not in message and "uoft-cs/cifar10" in message and "data.path" in message


def test_missing_path_and_unknown_name_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does-not-exist"):
        ImageDataModule("cifar10", path=str(tmp_path / "does-not-exist")).prepare_data()
    with pytest.raises(UserError, match="unknown dataset 'cifar11'; accepted: .*camelyon17.*stl10"):
        ImageDataModule("cifar11")


def test_hub_loads_call_load_dataset_with_hub_id_and_split(copies, monkeypatch):
    local = datasets.load_from_disk(str(copies["resisc45"]))
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return local[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = ImageDataModule("resisc45", image_size=32, **KW)
    dm.prepare_data()
    assert sorted(calls) == [("timm/resisc45", s) for s in ("test", "train", "validation")]
    calls.clear()
    dm.setup("fit")
    assert calls == [("timm/resisc45", "train"), ("timm/resisc45", "validation")]
    check_batch(next(iter(dm.train_dataloader())), dm)
    tiny = DatasetDict(train=local["train"], validation=local["validation"], test=local["test"])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None, **kw: tiny[split])
    with pytest.raises(UserError, match="302,436"):  # a partial hub copy of CAMELYON17 is refused
        ImageDataModule("camelyon17").setup("fit")


def corrupt_tree(tmp_path: Path) -> Path:
    root = tmp_path / "in100"
    write_jpeg_tree(root, ["n02869837", "n01749939", "n02488291"], np.random.default_rng(1))
    bad = root / "train" / "n01749939" / "n01749939_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, workers):
    dm = ImageDataModule("imagenet100", path=str(corrupt_tree(tmp_path)), image_size=32,
                         batch_size=4, num_workers=workers, pin_memory=False, max_bad_fraction=0.2,
                         cache_dir=str(tmp_path / "cache"))
    dm.setup("fit")
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == len(dm.dataset("train")) - 1 == 5 and dm.skipped["train"] == 1


def test_too_many_corrupt_images_is_a_user_error(tmp_path):
    dm = ImageDataModule("imagenet100", path=str(corrupt_tree(tmp_path)), image_size=32,
                         cache_dir=str(tmp_path / "cache"), **KW)
    dm.setup("fit")
    with pytest.raises(UserError, match="1 of 6 images .* max_bad_fraction 0.001"):
        list(dm.train_dataloader())


def png16_tree(tmp_path: Path) -> Path:
    """The JPEG tree, with one 16-bit grey PNG per class and split at half intensity."""
    root = tmp_path / "in100"
    write_jpeg_tree(root, ["n02869837", "n01749939"], np.random.default_rng(0))
    for folder in root.glob("*/*"):
        for k in range(2):
            (folder / f"{folder.name}_{k}.JPEG").unlink()
        PIL.Image.fromarray(np.full((40, 50), 32768, np.uint16)).save(folder / "half.png")
    return root


@pytest.mark.parametrize("in_memory", [False, True])
def test_16bit_png_reaches_the_batch_scaled_not_clipped(tmp_path, in_memory):
    dm = ImageDataModule("imagenet100", path=str(png16_tree(tmp_path)), image_size=32,
                         in_memory=in_memory, cache_dir=str(tmp_path / "cache"), **KW)
    batch = next(iter(dm.val_dataloader()))
    assert len(batch["index"]) == 2 and dm.skipped["val"] == 0
    assert (batch["image"] - 128 / 255).abs().max() < 1e-6  # 32768 / 65535, in 8 bits


def test_row_without_an_image_is_skipped_and_counted(tmp_path):
    rows = hub_split("cifar10", "test", 1, np.random.default_rng(0)).to_dict()
    rows["img"][3] = None  # a null cell, as a partly failed export leaves
    features = Features({"img": Image(), "label": ClassLabel(names=CIFAR10_NAMES)})
    DatasetDict(train=Dataset.from_dict(rows, features=features),
                test=Dataset.from_dict(rows, features=features)).save_to_disk(str(tmp_path / "c10"))
    dm = ImageDataModule("cifar10", path=str(tmp_path / "c10"), image_size=32, batch_size=4,
                         max_bad_fraction=0.2, cache_dir=str(tmp_path / "cache"), **KW)
    seen = torch.cat([b["index"] for b in dm.test_dataloader()])
    assert seen.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9] and dm.skipped["test"] == 1


def bomb_tree(tmp_path: Path) -> Path:
    """The JPEG tree, two train images made 60x60 and 80x100 (bomb bands at a 2000-pixel limit)."""
    root = tmp_path / "in100"
    write_jpeg_tree(root, ["n02869837", "n01749939", "n02488291"], np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for name, shape in (("n01749939_1", (60, 60, 3)), ("n02488291_0", (80, 100, 3))):
        path = next(root.glob(f"train/*/{name}.JPEG"))
        path.write_bytes(encode(rng.integers(0, 256, shape, np.uint8), "JPEG"))
    return root


def test_oversize_images_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)  # 40x50 fits; 60x60 warns; 80x100 errs
    root = bomb_tree(tmp_path)
    dm = ImageDataModule("imagenet100", path=str(root), image_size=32, batch_size=4,
                         max_bad_fraction=0.4, cache_dir=str(tmp_path / "cache"), **KW)
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == len(dm.dataset("train")) - 2 == 4 and dm.skipped["train"] == 2
    for name, band in (("n01749939_1", "Warning"), ("n02488291_0", "Error")):
        assert re.search(f"{name}.JPEG .*DecompressionBomb{band}", caplog.text)
    strict = ImageDataModule("imagenet100", path=str(root), image_size=32,
                             cache_dir=str(tmp_path / "cache"), **KW)
    with pytest.raises(UserError, match="1 of 6 images .* max_bad_fraction 0.001"):
        list(strict.train_dataloader())


def test_fashion_mnist_from_debian_files_matches_the_idx_labels():
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        train_labels = np.frombuffer(f.read(), np.uint8, offset=8)
    with gzip.open(FMNIST / "t10k-images-idx3-ubyte.gz") as f:
        test_images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    dm = ImageDataModule("fashion_mnist", image_size=28, in_chans=1, **KW)
    dm.setup()
    assert (len(dm.dataset("train")), len(dm.dataset("test"))) == (60000, 10000)
    assert dm.num_classes == 10 and len(dm.class_names) == 10
    assert np.array_equal(dm.dataset("train").labels.numpy(), train_labels)
    batch = next(iter(dm.test_dataloader()))
    check_batch(batch, dm, size=28, chans=1)
    expected = torch.from_numpy(test_images[batch["index"].numpy()].copy()).float()[:, None] / 255
    assert torch.equal(batch["image"], expected)  # eval at the native size: the raw pixels
    rgb = ImageDataModule("fashion_mnist", image_size=32, in_chans=3, **KW)
    image = next(iter(rgb.train_dataloader()))["image"]
    assert image.shape[1:] == (3, 32, 32) and torch.equal(image[:, 0], image[:, 2])


IDX_DAMAGE = {  # file, damage, what the one-line error must say
    "cut": ("images", lambda b: b[:1234], "is truncated: header says 10000x28x28"),
    "empty": ("images", lambda b: b"", "is empty"),
    "magic": ("images", lambda b: gzip.compress(b"\0\0\x09" + gzip.decompress(b)[3:]),
              "is not a uint8 IDX file"),
    "crc": ("images", lambda b: b[:-8] + bytes([b[-8] ^ 0xFF]) + b[-7:], "CRC check failed"),
    "labels": ("labels", lambda b: gzip.compress(gzip.decompress(b)[:-1]), "is truncated"),
    "count": ("labels", lambda b: gzip.compress(b"\0\0\x08\x01\0\0\x27\x0f"
                                                + gzip.decompress(b)[8:-1]),
              "holds 9,999 labels for 10,000 images"),
}


@pytest.mark.parametrize("case", list(IDX_DAMAGE))
def test_damaged_idx_file_is_a_one_line_error_naming_it(tmp_path, case):
    kind, damage, says = IDX_DAMAGE[case]
    for original in FMNIST.glob("*.gz"):  # the originals are never touched: copies, or links
        if original.name.startswith("train"):
            (tmp_path / original.name).symlink_to(original)
        else:
            (tmp_path / original.name).write_bytes(original.read_bytes())
    bad = tmp_path / f"t10k-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
    bad.write_bytes(damage(bad.read_bytes()))
    dm = ImageDataModule("fashion_mnist", path=str(tmp_path), image_size=28, in_chans=1, **KW)
    with pytest.raises(UserError) as err:
        dm.setup("test")
    message = str(err.value)
    assert message.startswith(f"{bad} ") and says in message and "\n" not in message
    assert message.endswith("re-install dataset-fashion-mnist or point data.path elsewhere")


def test_fast_path_flip_only_uses_no_pil_and_no_resampling(monkeypatch):
    monkeypatch.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("PIL used on the fast path"))
    dm = ImageDataModule("fashion_mnist", image_size=28, in_chans=1, rrc_scale=[1.0, 1.0],
                         limit_train=512, **KW)
    ds = dm.dataset("train")
    batch = ds.__getitems__(list(range(256)))
    raw = ds.images[batch["index"]].float() / 255
    same = (batch["image"] == raw).flatten(1).all(1)
    flipped = (batch["image"] == raw.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and flipped.any() and same.any()
    rrc = ImageDataModule("fashion_mnist", image_size=28, in_chans=1, **KW).dataset("train")
    out = rrc.__getitems__(list(range(256)))["image"]
    assert out.shape == (256, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, rrc.images[:256] / 255)  # cropped and resized


def test_batched_resized_crop_matches_pil_bilinear():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (28, 36), np.uint8)
    x = torch.from_numpy(image).float()[None, None]
    for box, size in [((3, 5, 20, 20), 40), ((1, 2, 30, 26), 9), ((0, 0, 36, 28), 20)]:
        x0, y0, w, h = box
        pil = PIL.Image.fromarray(image).resize((size, size), PIL.Image.BILINEAR,
                                                box=(x0, y0, x0 + w, y0 + h))
        ours = resized_crop(x, torch.tensor([box], dtype=torch.float32), size)[0, 0]
        assert (ours - torch.tensor(np.array(pil)).float()).abs().max() <= 1.0  # PIL rounds
    square = x[..., :28]
    assert torch.allclose(resized_crop(square, torch.tensor([[0.0, 0, 28, 28]]), 28), square)


def test_batch_transform_boxes_and_eval_center_crop():
    boxes = transforms.rrc_boxes(2000, 28, 36, (0.25, 1.0))
    x0, y0, w, h = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 36).all() and (y0 + h <= 28).all()
    area = w * h / (28 * 36)
    assert area.min() > 0.2 and area.max() <= 1 and area.std() > 0.1  # scale range, px-rounded
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[..., 2:6, 2:6] = 255  # a bright centre half: what crop_pct 0.5 keeps
    crop = transforms.BatchTransform(4, 0.5, small=False, train=False, rrc_scale=(0.08, 1.0), in_chans=3)
    assert torch.equal(crop(image), torch.ones(1, 3, 4, 4))
    whole = transforms.BatchTransform(4, 0.5, small=True, train=False, rrc_scale=(0.08, 1.0), in_chans=1)
    assert whole(image).min() < 0.5  # small datasets keep the border
