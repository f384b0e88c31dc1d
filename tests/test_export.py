"""Export to a timm folder, reload with plain timm, and embed a folder of images (issue 8)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageOps

from distortkd import cli, embed, export
from distortkd.errors import UserError
from distortkd.modules import architecture
from distortkd.vit import build_vit

CONF = Path(cli.CONF)
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # not the timm default (0.5, 0.5, 0.5)
METRICS = {"val/cos_clean": 0.9123, "val/cos_clean_baseline": 0.6543, "status": "ok"}
# (size, mode, suffix): every size scales exactly to a 36-px short side (32 / 0.875 → 36).
IMAGES = [((72, 48), "RGB", "png"), ((45, 60), "L", "png"), ((36, 36), "RGB", "jpg"),
          ((40, 80), "L", "jpeg"), ((96, 48), "RGB", "png")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A distill run folder as ``distortkd-distill`` leaves it, and the student it holds."""
    torch.manual_seed(0)
    student = build_vit("vit_tiny_patch16_224", pretrained=False, mean=MEAN, std=STD, **TINY).eval()
    run_dir = tmp_path_factory.mktemp("runs") / "distill" / "resisc45_vittest_noise_strong_multilevel_s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    state = {"student.backbone." + k: v for k, v in student.backbone.state_dict().items()}
    torch.save({"state_dict": state, "distortkd": architecture(student)}, run_dir / "checkpoints" / "last.ckpt")
    model = OmegaConf.load(CONF / "model" / "vit_tiny_test.yaml")
    model.mean, model.std = list(MEAN), list(STD)
    cfg = OmegaConf.create({
        "task": "distill", "method": "ours", "model": model,
        "distortion": {"name": "noise_strong", "family": "gaussian_noise", "params": {"sigma": 0.5}},
        "data": {"name": "resisc45", "crop_pct": 0.875}, "loss": OmegaConf.load(CONF / "loss" / "multilevel.yaml"),
    })
    OmegaConf.save(cfg, run_dir / "config.yaml")
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    return run_dir, student


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    assert export.main([str(run[0]), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Five good images of mixed sizes and modes (one in a subfolder) and one broken file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, ((w, h), mode, suffix) in enumerate(IMAGES):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        path = root / ("sub" if i == 3 else "") / f"img{i}.{suffix}"
        path.parent.mkdir(exist_ok=True)
        exif = Image.Exif()
        if i == 0:
            exif[0x0112] = 6  # EXIF orientation: stored sideways, shown rotated by 90°
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, exif=exif)
    (root / "broken.jpg").write_bytes(rng.bytes(500))
    return root


def test_export_loads_with_plain_timm(run, exported):
    _, student = run
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 0.875
    assert cfg["model_args"]["patch_size"] == 8 and cfg["distortkd"]["distortion"]["params"] == {"sigma": 0.5}
    model = timm.create_model(
        cfg["architecture"], pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported / "model.safetensors"), mean=cfg["mean"], std=cfg["std"]),
        **cfg["model_args"]).eval()
    assert tuple(model.pretrained_cfg["mean"]) == tuple(cfg["mean"]) == MEAN
    assert tuple(model.pretrained_cfg["std"]) == tuple(cfg["std"]) == STD
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), student.backbone.forward_features(x),
                                   atol=1e-6, rtol=0)
    local = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    assert tuple(local.pretrained_cfg["mean"]) == MEAN and local.pretrained_cfg["input_size"] == (3, 32, 32)


def test_model_card_names_distortion_and_metrics_and_its_code_runs(run, exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "tags:\n- timm\n" in card
    for text in ("noise_strong", "gaussian_noise", "`sigma` = 0.5", "resisc45", "multilevel",
                 "`gamma` = 10.0", "val/cos_clean_baseline", "0.9123", "0.6543"):
        assert text in card, text
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace = {}
    exec(code, namespace)  # the card's own loading snippet, as a reader would paste it
    model = namespace["model"]
    assert tuple(model.pretrained_cfg["mean"]) == MEAN and model.pretrained_cfg["input_size"] == (3, 32, 32)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), run[1].backbone(x), atol=1e-6, rtol=0)


def test_load_exported_equals_the_original_encoder(run, exported):
    encoder = export.load_exported(exported)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder.features(x).cls, run[1].features(x).cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(encoder.mean.flatten(), torch.tensor(MEAN))


def _reference(student, path: Path) -> torch.Tensor:
    """CLS of one image, preprocessed by hand: upright, short side to 36 px, centred 32-px crop."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    s = 36 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    left, top = (im.size[0] - 32) // 2, (im.size[1] - 32) // 2
    x = torch.from_numpy(np.array(im.crop((left, top, left + 32, top + 32)))).permute(2, 0, 1)
    with torch.no_grad():
        return student.features(x[None].float() / 255).cls[0]


def test_embed_npy_skips_broken_files(run, exported, images, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    assert embed.main([str(exported), str(images), str(out), "--workers", "2", "--batch-size", "2",
                       "--patches"]) == 0
    cls = np.load(out)
    files = out.with_suffix(".files.txt").read_text().splitlines()
    assert cls.shape == (5, 32) and len(files) == 5 and not any("broken" in f for f in files)
    assert np.load(out.with_suffix(".patches.npy")).shape == (5, 16, 32)
    assert "broken.jpg" in out.with_suffix(".skipped.txt").read_text()
    assert "skipped 1 undecodable" in capsys.readouterr().err
    for row, file in zip(cls, files, strict=True):
        np.testing.assert_allclose(row, _reference(run[1], Path(file)).numpy(), atol=1e-5)


def test_embed_parquet_from_checkpoint_matches_npy(run, exported, images, tmp_path):
    embed.embed(exported, images, tmp_path / "a.npy", workers=0)
    embed.embed(run[0], images, tmp_path / "b.parquet", workers=0)  # the run folder, not the export
    table = pd.read_parquet(tmp_path / "b.parquet")
    assert list(table.columns) == ["path", "embedding"]
    assert table["path"].tolist() == (tmp_path / "a.files.txt").read_text().splitlines()
    np.testing.assert_allclose(np.stack(table["embedding"]), np.load(tmp_path / "a.npy"), atol=1e-6)


def test_embed_reads_16bit_pngs_as_training_does_and_skips_oversize_ones(exported, tmp_path,
                                                                          monkeypatch):
    grey = np.random.default_rng(3).integers(0, 256, (48, 72), dtype=np.uint8)
    folder = tmp_path / "odd"
    folder.mkdir()
    Image.fromarray(grey).save(folder / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "sixteen.png")  # same, 16 bits
    Image.new("RGB", (80, 80)).save(folder / "warns.png")  # PIL's warning band at a 5000 limit
    Image.new("RGB", (120, 100)).save(folder / "errs.png")  # its error band, over 2 x 5000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    out = tmp_path / "odd.npy"
    result = embed.embed(exported, folder, out, workers=0)
    assert [f.name for f in result.files] == ["eight.png", "sixteen.png"]
    np.testing.assert_allclose(result.cls[1], result.cls[0], atol=1e-6)
    skipped = out.with_suffix(".skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(folder / "errs.png"),
                                                         str(folder / "warns.png")]
    assert "DecompressionBombError" in skipped[0] and "DecompressionBombWarning" in skipped[1]


def test_checkpoint_resolution_prefers_best(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert export.resolve_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "checkpoints" / "best.ckpt").touch()
    assert export.resolve_checkpoint(tmp_path).name == "best.ckpt"


def test_missing_checkpoint_or_config_names_the_path(run, images, tmp_path, capsys):
    with pytest.raises(UserError, match="nope.ckpt"):
        export.export(tmp_path / "nope.ckpt", tmp_path / "out")
    lone = tmp_path / "lone" / "checkpoints"
    lone.mkdir(parents=True)
    shutil.copy(run[0] / "checkpoints" / "last.ckpt", lone / "last.ckpt")
    with pytest.raises(UserError, match=r"config\.yaml.*lone"):
        export.export(lone / "last.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export.main([str(tmp_path / "lone"), str(tmp_path / "out")]) == 2
    assert "error: no config.yaml" in capsys.readouterr().err
    assert embed.main([str(tmp_path), str(images), str(tmp_path / "e.npy")]) == 2
    assert "neither an exported folder" in capsys.readouterr().err
