"""``data.cache=uint8``: the canvas file, its reuse and rebuilds, and the device-side crops, on a
generated ImageNet-100 image folder of JPEGs of varied sizes (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import PIL.Image
import pytest
import torch

from distortkd import cache, imagesets, transforms
from distortkd.data import ImageDataModule
from distortkd.errors import UserError

WNIDS = (Path(cache.__file__).parent / "imagenet100_classes.txt").read_text().split()[:4]
SIZES = [(300, 200), (180, 260), (240, 240), (320, 180), (200, 300)]  # (w, h)
PER_CLASS = {"train": 10, "val": 3}
SIZE, SIDE = 56, 64  # image_size and its default canvas, floor(56 / 0.875)
KW = dict(image_size=SIZE, crop_pct=0.875, batch_size=16, num_workers=0, pin_memory=False)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def write_tree(root: Path, seed: int = 0) -> Path:
    """Smooth JPEGs (upsampled noise on a per-image tint, reddish on average) in wnid folders."""
    rng = np.random.default_rng(seed)
    for split, n in PER_CLASS.items():
        for c, wnid in enumerate(WNIDS):
            (root / split / wnid).mkdir(parents=True)
            for k in range(n):
                w, h = SIZES[(c + k) % len(SIZES)]
                tint = (np.array([0.65, 0.5, 0.35]) + rng.uniform(-0.15, 0.15, 3)) * 255
                noise = rng.normal(0, 50, (h // 10, w // 10, 3)) + tint
                small = PIL.Image.fromarray(noise.clip(0, 255).astype(np.uint8))
                small.resize((w, h), PIL.Image.BILINEAR).save(root / split / wnid / f"{k}.JPEG",
                                                              quality=95)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("in100") / "in")


def module(tree: Path, tmp_path: Path, **kw) -> ImageDataModule:
    return ImageDataModule("imagenet100", path=str(tree), cache_dir=str(tmp_path / "cache"),
                           **{**KW, **kw})


def pil_canvas(path: str, side: int) -> np.ndarray:
    """Plain PIL: shorter side to ``side`` (bilinear, torchvision's size rule), centred square."""
    with PIL.Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    size = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    im = im.resize(size, PIL.Image.BILINEAR)
    left, top = int(round((size[0] - side) / 2)), int(round((size[1] - side) / 2))
    return np.array(im.crop((left, top, left + side, top + side))).transpose(2, 0, 1).copy()


def all_rows(ds) -> dict:
    return ds.__getitems__(list(range(len(ds))))


def count_decodes(monkeypatch) -> list:
    calls, decode = [], imagesets.HFImages._decode

    def counted(self, value, position):
        calls.append(position)
        return decode(self, value, position)

    monkeypatch.setattr(imagesets.HFImages, "_decode", counted)
    return calls


def image_column(dm: ImageDataModule, split: str = "train") -> list[dict]:
    return dm._raw[split]["table"]["image"]


def cache_folder(dm: ImageDataModule, split: str = "train") -> Path:
    return Path(dm._raw[split]["canvas"]).parent


@pytest.mark.parametrize("side", [None, 75])
def test_canvas_is_the_pil_resize_and_center_crop_pixel_for_pixel(tree, tmp_path, side):
    dm = module(tree, tmp_path, cache="uint8", cache_size=side)
    ds = dm.dataset("train")
    side = side or SIDE
    assert isinstance(ds, cache.CanvasImages) and ds.shape == (40, 3, side, side)
    paths = [r["path"] for r in image_column(dm)]
    for row, path in enumerate(paths):
        assert np.array_equal(ds.images[row], pil_canvas(path, side)), path
    meta = json.loads((cache_folder(dm) / cache.SIDECAR).read_text())
    assert meta["rows"] == 40 and meta["shape"] == [40, 3, side, side] and meta["split"] == "train"
    assert meta["version"] == cache.VERSION and meta["bad"] == 0


def test_labels_and_index_stay_aligned_with_source_rows(tree, tmp_path):
    dm = module(tree, tmp_path, cache="uint8", augment=False, num_workers=2)
    dm.setup("fit")
    table, seen = dm._raw["train"]["table"], []
    for batch in dm.train_dataloader():  # shuffled, through worker processes
        batch = dm.to_images(batch)
        for image, label, i in zip(batch["image"], batch["label"], batch["index"], strict=True):
            path = table[int(i)]["image"]["path"]
            assert label == WNIDS.index(Path(path).parent.name)
            canvas = torch.from_numpy(pil_canvas(path, SIDE)).float() / 255
            assert torch.allclose(image, canvas[:, 4:-4, 4:-4], atol=1e-6)  # the centre 56 of 64
            seen.append(int(i))
    assert sorted(seen) == list(range(40))


def test_eval_crop_matches_the_pil_path(tree, tmp_path):
    pil = all_rows(module(tree, tmp_path).dataset("val"))
    ours = module(tree, tmp_path, cache="uint8")
    canvases = all_rows(ours.dataset("val"))
    assert canvases["image"].dtype == torch.uint8 and torch.equal(canvases["index"], pil["index"])
    assert torch.equal(canvases["label"], pil["label"])
    out = ours.to_images(canvases)["image"]
    assert out.shape == pil["image"].shape == (12, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert (out - pil["image"]).abs().max() < 1e-5  # the default canvas holds the very pixels
    wider = module(tree, tmp_path, cache="uint8", cache_size=90)  # eval resamples 79 px to 56
    out = wider.to_images(all_rows(wider.dataset("val")))["image"]
    assert (out - pil["image"]).abs().mean() < 0.02 and (out - pil["image"]).abs().max() < 0.25
    for dims in ((0, 2, 3), (2, 3)):  # per channel, and per image and channel
        assert torch.allclose(out.mean(dims), pil["image"].mean(dims), atol=0.005)
        assert torch.allclose(out.std(dims), pil["image"].std(dims), atol=0.01)


def test_train_crops_have_the_statistics_of_the_pil_path(tree, tmp_path):
    def images(dm, epochs=10):
        torch.manual_seed(0)
        loader = dm.train_dataloader()
        return torch.cat([dm.to_images(b, train=True)["image"] for _ in range(epochs)
                          for b in loader])

    pil, ours = images(module(tree, tmp_path)), images(module(tree, tmp_path, cache="uint8"))
    assert ours.shape == pil.shape == (400, 3, SIZE, SIZE) and ours.dtype == torch.float32
    assert 0 <= ours.min() and ours.max() <= 1
    # Per channel over 400 random crops. Measured: means within 0.002; stds 0.005 lower, as a
    # small crop is upsampled from the 64 px canvas instead of the 180-320 px original.
    for stat, atol in ((torch.mean, 0.006), (torch.std, 0.012)):
        got, want = stat(ours.transpose(0, 1).flatten(1), 1), stat(pil.transpose(0, 1).flatten(1), 1)
        assert torch.allclose(got, want, atol=atol), (stat, got, want)
    assert abs(ours.std((2, 3)).mean() - pil.std((2, 3)).mean()) < 0.012  # per image


def test_train_flips_half_the_images_and_crops_within_rrc_scale(tree, tmp_path, monkeypatch):
    flat = module(tree, tmp_path, cache="uint8", rrc_scale=[1.0, 1.0])  # whole canvas, maybe flipped
    batch = all_rows(flat.dataset("train"))
    canvas = batch["image"].float() / 255
    whole = transforms.resized_crop(canvas, torch.tensor([[0.0, 0, SIDE, SIDE]]).expand(40, 4), SIZE)
    flips = []
    for _ in range(10):
        out = flat.to_images(batch, train=True)["image"]
        same = (out - whole).flatten(1).abs().amax(1) < 1e-5
        flipped = (out - whole.flip(-1)).flatten(1).abs().amax(1) < 1e-5
        assert (same ^ flipped).all()
        flips.append(flipped)
    assert 0.4 < torch.cat(flips).float().mean() < 0.6
    assert torch.equal(flat.to_images(batch)["image"], flat.to_images(batch)["image"])  # eval: none

    boxes, rrc_boxes = [], transforms.rrc_boxes
    monkeypatch.setattr(transforms, "rrc_boxes", lambda *a, **k: boxes.append(rrc_boxes(*a, **k))
                        or boxes[-1])
    rrc = module(tree, tmp_path, cache="uint8", rrc_scale=[0.25, 0.8])
    batch = all_rows(rrc.dataset("train"))
    torch.manual_seed(0)
    first = rrc.to_images(batch, train=True)["image"]
    for _ in range(9):
        rrc.to_images(batch, train=True)
    torch.manual_seed(0)
    assert torch.equal(rrc.to_images(batch, train=True)["image"], first)  # global RNG, per batch
    x0, y0, w, h = torch.cat(boxes).T
    area = w * h / SIDE**2  # boxes are drawn on the canvas
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= SIDE).all() and (y0 + h <= SIDE).all()
    assert area.min() > 0.23 and area.max() < 0.83 and area.std() > 0.1  # px-rounded scale range
    assert not torch.equal(rrc.to_images(batch, train=False)["image"], first)


def test_second_construction_reuses_the_cache(tree, tmp_path, monkeypatch):
    first = module(tree, tmp_path, cache="uint8")
    first.setup("fit")
    images = all_rows(first.dataset("train"))["image"]
    monkeypatch.setattr(imagesets.HFImages, "_decode", lambda *a: pytest.fail("decoded again"))
    again = module(tree, tmp_path, cache="uint8")
    again.prepare_data()
    again.setup("fit")
    assert torch.equal(all_rows(again.dataset("train"))["image"], images)


def test_sidecar_mismatch_and_half_written_cache_are_rebuilt(tree, tmp_path, monkeypatch):
    dm = module(tree, tmp_path, cache="uint8")
    dm.setup("fit")
    where, images = cache_folder(dm), all_rows(dm.dataset("train"))["image"]
    calls = count_decodes(monkeypatch)
    other = module(tree, tmp_path, cache="uint8", cache_size=70)  # another S: its own folder
    assert other.dataset("train").shape[-1] == 70 and len(calls) == 40
    assert (where / cache.SIDECAR).exists() and cache_folder(other) != where

    meta = json.loads((where / cache.SIDECAR).read_text())
    (where / cache.SIDECAR).write_text(json.dumps({**meta, "shape": [40, 3, 70, 70]}))
    calls.clear()
    assert torch.equal(all_rows(module(tree, tmp_path, cache="uint8").dataset("train"))["image"],
                       images) and len(calls) == 40

    # A build killed half-way: its .tmp stays, and the old sidecar is already gone.
    meta = json.loads((where / cache.SIDECAR).read_text())
    (where / cache.SIDECAR).write_text(json.dumps({**meta, "version": 0}))
    decode = imagesets.HFImages._decode
    monkeypatch.setattr(imagesets.HFImages, "_decode", lambda self, v, p: decode(self, v, p) if p < 20
                        else (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        module(tree, tmp_path, cache="uint8").dataset("train")
    assert not (where / cache.SIDECAR).exists()
    (where / f"{cache.IMAGES}.tmp").write_bytes(b"half")  # as if SIGKILLed: no clean-up ran
    monkeypatch.setattr(imagesets.HFImages, "_decode", decode)
    calls = count_decodes(monkeypatch)
    rebuilt = module(tree, tmp_path, cache="uint8")
    assert torch.equal(all_rows(rebuilt.dataset("train"))["image"], images) and len(calls) == 40
    assert not (where / f"{cache.IMAGES}.tmp").exists() and (where / cache.SIDECAR).exists()


def corrupt_tree(tmp_path: Path) -> Path:
    root = write_tree(tmp_path / "bad", seed=1)
    bad = root / "train" / WNIDS[1] / "3.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    return root


def test_corrupt_images_are_masked_and_dropped(tmp_path):
    root = corrupt_tree(tmp_path)
    dm = module(root, tmp_path, cache="uint8", num_workers=2, max_bad_fraction=0.05)
    dm.setup("fit")
    valid = np.load(cache_folder(dm) / cache.VALID)
    table = dm._raw["train"]["table"]
    bad_row = [i for i in range(40) if table[i]["image"]["path"].endswith(f"{WNIDS[1]}/3.JPEG")]
    assert np.flatnonzero(~valid).tolist() == bad_row and dm.skipped["train"] == 1
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == 39 and bad_row[0] not in seen.tolist()
    strict = module(root, tmp_path / "strict", cache="uint8", num_workers=2)
    with pytest.raises(UserError, match="^1 of 40 images .* max_bad_fraction 0.001") as err:
        strict.setup("fit")
    assert "\n" not in str(err.value)  # the message, not the worker's traceback
    assert not list((tmp_path / "strict").rglob(cache.SIDECAR))  # nothing trusted was left


def test_16bit_png_is_scaled_and_oversize_image_skipped_in_the_canvas(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "odd", seed=2)
    (root / "train" / WNIDS[0] / "0.JPEG").unlink()
    half = PIL.Image.fromarray(np.full((200, 300), 32768, np.uint16))  # 16-bit grey
    half.save(root / "train" / WNIDS[0] / "0.png")
    big = root / "train" / WNIDS[2] / "1.JPEG"
    PIL.Image.new("RGB", (500, 400), (90, 60, 30)).save(big)  # 200k pixels: bomb at a 70k limit
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 70_000)  # the other images hold <= 60k
    dm = module(root, tmp_path, cache="uint8", max_bad_fraction=0.05)
    dm.setup("fit")
    paths = [row["path"] for row in image_column(dm)]
    png, bomb = (next(i for i, p in enumerate(paths) if p.endswith(end))
                 for end in (f"{WNIDS[0]}/0.png", f"{WNIDS[2]}/1.JPEG"))
    canvases = np.memmap(dm._raw["train"]["canvas"], np.uint8, "r", shape=(40, 3, SIDE, SIDE))
    assert (canvases[png] == 128).all()  # 32768 / 65535 in 8 bits, not clipped to 255
    valid = np.load(cache_folder(dm) / cache.VALID)
    assert np.flatnonzero(~valid).tolist() == [bomb] and dm.skipped["train"] == 1


def test_bad_options_are_user_errors(tree, tmp_path):
    with pytest.raises(UserError, match="cache 'fp16'; accepted: null, uint8"):
        module(tree, tmp_path, cache="fp16")
    with pytest.raises(UserError, match="in_memory=true"):
        module(tree, tmp_path, cache="uint8", in_memory=True)
    with pytest.raises(UserError, match="IDX files"):
        ImageDataModule("fashion_mnist", image_size=28, in_chans=1, cache="uint8").setup("fit")


class Probe(L.LightningModule):
    """Records the batches its steps and its own ``on_after_batch_transfer`` receive."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 100)
        self.seen: list[tuple[str, torch.Tensor]] = []

    def on_after_batch_transfer(self, batch, dataloader_idx):
        self.seen.append(("hook", batch["image"]))
        return batch

    def training_step(self, batch, batch_idx):
        self.seen.append(("train", batch["image"]))
        return torch.nn.functional.cross_entropy(self.head(batch["image"].mean((2, 3))),
                                                 batch["label"])

    def validation_step(self, batch, batch_idx):
        self.seen.append(("val", batch["image"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You have overridden `on_after_batch_transfer` in both")
def test_trainer_steps_receive_float_images_of_image_size(tree, tmp_path, monkeypatch):
    calls, rrc_boxes = [], transforms.rrc_boxes
    monkeypatch.setattr(transforms, "rrc_boxes", lambda *a, **k: calls.append(a) or rrc_boxes(*a, **k))
    dm, probe = module(tree, tmp_path, cache="uint8", num_workers=1), Probe()
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(probe, datamodule=dm)
    kinds = [k for k, _ in probe.seen]
    assert kinds == ["hook", "train", "hook", "val"]  # the module's own hook still runs, after ours
    for _, image in probe.seen:
        assert image.dtype == torch.float32 and image.shape[1:] == (3, SIZE, SIZE)
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0.01
    assert [a[:3] for a in calls] == [(16, SIDE, SIDE)]  # training crops for the train batch only


def test_loops_outside_lightning_read_float_batches_equal_to_the_pil_path(tree, tmp_path):
    """``device_batches``: what evaluation, k-NN banks and figures iterate; canvases arrive as the
    same ``[0, 1]`` eval crops as the PIL path, index and labels aligned."""
    pil, ours = module(tree, tmp_path), module(tree, tmp_path, cache="uint8")
    pil_batches = list(pil.device_batches(pil.val_dataloader(), "cpu"))
    our_batches = list(ours.device_batches(ours.val_dataloader(), torch.device("cpu")))
    assert len(our_batches) == len(pil_batches) >= 1
    for got, want in zip(our_batches, pil_batches, strict=True):
        assert got["image"].dtype == torch.float32 and got["image"].shape[-2:] == (SIZE, SIZE)
        assert 0 <= got["image"].min() and got["image"].max() <= 1
        assert torch.equal(got["index"], want["index"]) and torch.equal(got["label"], want["label"])
        assert (got["image"] - want["image"]).abs().max() < 1e-5
