"""The published pre-corrupted benchmarks (CIFAR-10-C, ImageNet-C) on tiny fixtures in their exact
layouts, evaluated through the real evaluate entry point after a real fine-tune, and the
benchmark's mCE against a hand computation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import DatasetDict
from test_cli import _compose
from test_data import CMC, hub_split
from test_report import parse_table, run_report, section, write_run

from distortkd import benchmarks, build, cli
from distortkd.benchmarks import ALEXNET_ERR, BENCHMARK_CORRUPTIONS, mce_vs_alexnet
from distortkd.build import build_distortion
from distortkd.checks import check_config
from distortkd.errors import UserError
from distortkd.evaluation import load_finetuned
from distortkd.splits import first_k

N = 8  # test images per severity block
LIMIT = 6  # data.limit_eval: the evaluation keeps the same first-K images per cell


def _common(name: str, copy: Path) -> list[str]:
    return ["experiment=test", f"data={name}", f"data.path={copy}", "data.limit_train=40",
            f"data.limit_eval={LIMIT}", "data.batch_size=16", "data.num_workers=0",
            "data.pin_memory=false", "method=supervised", "distortion=noise_strong"]


def _finetune(root: Path, name: str, per_class: int) -> list[str]:
    """A local copy of ``name`` in its hub schema and a real 1-epoch fine-tune on it."""
    rng, copy = np.random.default_rng(0), root / f"{name}_copy"
    splits = {"cifar10": ("train", "test"), "imagenet100": ("train", "validation")}[name]
    DatasetDict({s: hub_split(name, s, per_class, rng) for s in splits}).save_to_disk(str(copy))
    args = _common(name, copy)
    cfg = _compose("finetune", args, root)
    cli.run_finetune(cfg, root / cfg.experiment / "finetune" / cfg.run_name)
    return args


def _cifar_c(folder: Path, names=BENCHMARK_CORRUPTIONS, length: int = 5 * N, classes: int = 10) -> Path:
    """CIFAR-10-C's layout: ``<corruption>.npy`` uint8 [5 N, 32, 32, 3] and ``labels.npy`` [5 N]."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        np.save(folder / f"{name}.npy", rng.integers(0, 256, (length, 32, 32, 3), np.uint8))
    np.save(folder / "labels.npy", rng.integers(0, classes, 5 * N).astype(np.int64))
    return folder


def _evaluate(root: Path, args: list[str], suite: str, path: Path) -> tuple:
    cfg = _compose("evaluate", [*args, f"suite={suite}", f"benchmark.path={path}", "benchmark.extra=false"], root)
    check_config(cfg, build_distortion)
    metrics = cli.run_evaluate(cfg, root / "eval")
    return cfg, metrics


def _model(cfg, classes: int):
    ckpt = Path(cli.provenance(cfg)["checkpoint"]["path"])
    return load_finetuned(cfg, build.build_model, classes, ckpt).eval()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    return root, _finetune(root, "cifar10", 4)


def test_cifar10c_every_cell_reads_its_severity_block(cifar, tmp_path):
    root, args = cifar
    folder = _cifar_c(tmp_path / "CIFAR-10-C")
    cfg, metrics = _evaluate(root, args, "cifar10c", folder)
    rows = metrics["rows"]
    assert [(r["distortion"], r["severity"]) for r in rows] == benchmarks.cells(False)
    assert metrics["suite"] == "cifar10c" and metrics["benchmark/skipped_images"] == 0
    assert set(cli.promised(cfg)) <= set(metrics)  # what a finished run must store, it stores
    assert "cos_cls" not in rows[0]  # no clean twin of a stored image: no teacher diagnostics
    # Independently: the model on the stored uint8 block of each severity, first-K images, labels.npy.
    model, labels, keep = _model(cfg, 10), np.load(folder / "labels.npy"), first_k(np.arange(N), LIMIT, 0)
    for row in rows[:10] + rows[-5:]:
        s = row["severity"]
        block = np.load(folder / f"{row['distortion']}.npy")[(s - 1) * N: s * N][keep]
        x = torch.from_numpy(block).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            pred = model.head(model.encoder(x)).argmax(-1).numpy()
        expected = float((pred == labels[(s - 1) * N: s * N][keep]).mean())
        assert row["acc1"] == pytest.approx(expected), row
        assert metrics[f"test/{row['distortion']}/{s}/acc1"] == row["acc1"]


def _jpeg(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 50, 3), np.uint8)).save(path, quality=90)


def _imagenet_c(folder: Path, wnids: list[str], per_class: int = 2) -> Path:
    """ImageNet-C's layout: ``<corruption>/<severity>/<wnid>/*.JPEG``, 40 × 50 images."""
    rng = np.random.default_rng(2)
    for name in BENCHMARK_CORRUPTIONS:
        for level in benchmarks.LEVELS:
            for wnid in wnids:
                for i in range(per_class):
                    _jpeg(folder / name / str(level) / wnid / f"ILSVRC2012_val_{i:08d}.JPEG", rng)
    return folder


def test_imagenet_c_keeps_cmc_classes_in_our_order_and_counts_the_rest(tmp_path_factory, capsys):
    root = tmp_path_factory.mktemp("in100")
    args = _finetune(root, "imagenet100", 1)
    stranger = "n01440764"  # tench: an ImageNet class that is not one of CMC's 100
    assert stranger not in CMC
    wnids = [CMC[7], CMC[42], stranger]
    folder = _imagenet_c(root / "ImageNet-C", wnids)
    cfg, metrics = _evaluate(root, args, "imagenet_c", folder)
    rows = metrics["rows"]
    assert [(r["distortion"], r["severity"]) for r in rows] == benchmarks.cells(False)
    assert metrics["benchmark/skipped_images"] == 2 * len(rows)  # the stranger's 2 images, every cell
    assert metrics["benchmark/skipped_class_folders"] == [stranger]
    assert "skipped 150 images in 1 class folders not among imagenet100's 100 classes" in capsys.readouterr().out
    # Independently: PIL decode, resize of the short side to 32 and centre crop, labels = CMC index.
    model = _model(cfg, 100)
    for row in rows[:3]:
        cell = folder / row["distortion"] / str(row["severity"])
        files = [(f, CMC.index(w)) for w in sorted(wnids[:2]) for f in sorted((cell / w).iterdir())]
        files = [files[i] for i in first_k(np.arange(len(files)), LIMIT, 0)]
        x = torch.stack([_eval_crop(f) for f, _ in files])
        with torch.no_grad():
            pred = model.head(model.encoder(x)).argmax(-1).numpy()
        assert row["acc1"] == pytest.approx(float((pred == [y for _, y in files]).mean())), row


def _eval_crop(path: Path) -> torch.Tensor:
    image = PIL.Image.open(path).convert("RGB")
    w, h = image.size
    image = image.resize((round(32 * w / h), 32), PIL.Image.BILINEAR)  # short side (h) to 32
    left = (image.size[0] - 32) // 2
    image = image.crop((left, 0, left + 32, 32))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def _check(tmp_path, suite: str, path, data: str = "cifar10", extra: str = "false"):
    cfg = _compose("evaluate", ["experiment=test", f"data={data}", f"suite={suite}",
                                f"benchmark.path={path}", f"benchmark.extra={extra}"], tmp_path)
    check_config(cfg, build_distortion)


def test_layout_errors_are_one_line_naming_the_bad_file(tmp_path):
    with pytest.raises(UserError, match=r"benchmark.path='.*nowhere' is not a folder; accepted: the CIFAR-10-C"):
        _check(tmp_path, "cifar10c", tmp_path / "nowhere")
    folder = _cifar_c(tmp_path / "c10", names=BENCHMARK_CORRUPTIONS[1:])
    with pytest.raises(UserError, match=r"lacks gaussian_noise.npy; found: brightness.npy, contrast.npy"):
        _check(tmp_path, "cifar10c", folder)
    full = _cifar_c(tmp_path / "c10full")
    with pytest.raises(UserError, match=r"lacks speckle_noise.npy.*or benchmark.extra=false"):
        _check(tmp_path, "cifar10c", full, extra="true")
    np.save(full / "fog.npy", np.zeros((5 * N - 1, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match=rf"fog.npy holds {5 * N - 1} images; accepted: 5 severities × "
                                        rf"the labels of labels.npy \({N * 5} labels"):
        _check(tmp_path, "cifar10c", full)
    bad = _cifar_c(tmp_path / "c10bad", classes=10)
    np.save(bad / "labels.npy", np.full(5 * N, 10, np.int64))
    with pytest.raises(UserError, match=r"labels in \[10, 10\]; accepted for CIFAR-10-C: 0..9"):
        _check(tmp_path, "cifar10c", bad)
    np.save(bad / "labels.npy", np.zeros(5 * N, np.int64))
    (bad / "snow.npy").write_bytes(b"not an array")
    with pytest.raises(UserError, match=r"snow.npy is not a readable .npy array"):
        _check(tmp_path, "cifar10c", bad)
    with pytest.raises(UserError, match=r"suite='cifar10-c' is not accepted; accepted: paper, heldout, "
                                        r"cifar10c, cifar100c, imagenet_c$"):
        _check(tmp_path, "cifar10-c", full)
    with pytest.raises(UserError, match=r"suite='cifar100c' corrupts the cifar100 test split; got data=cifar10"):
        _check(tmp_path, "cifar100c", full)


def test_imagenet_c_missing_severity_folder_is_named(tmp_path):
    folder = tmp_path / "ImageNet-C"
    for name in BENCHMARK_CORRUPTIONS:
        for level in benchmarks.LEVELS:
            if (name, level) != ("fog", 3):
                (folder / name / str(level) / CMC[0]).mkdir(parents=True)
    with pytest.raises(UserError, match=r"lacks fog/3; found: brightness/1, brightness/2"):
        _check(tmp_path, "imagenet_c", folder, data="imagenet100")


@pytest.mark.slow
def test_console_script_refuses_a_missing_folder_in_one_line(tmp_path):
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp_path), "CI": "1"}
    exe = Path(sys.executable).parent / "distortkd-evaluate"
    proc = subprocess.run([str(exe), "experiment=test", "data=cifar10", "suite=cifar10c",
                           f"benchmark.path={tmp_path / 'missing'}"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: benchmark.path=")
    assert "Traceback" not in proc.stderr


def test_mce_vs_alexnet_by_hand():
    errors = {c: [0.1 * s + 0.01 * i for s in range(1, 6)] for i, c in enumerate(BENCHMARK_CORRUPTIONS)}
    # Hand: CE_c = 100 · Σ_s err / (5 · AlexNet's mean error of c); mCE = mean of the 15.
    fog = 100 * (0.1 + 0.2 + 0.3 + 0.4 + 0.5 + 5 * 0.09) / (5 * 0.819324)
    mce, ce = mce_vs_alexnet({**errors, "saturate": [0.5] * 5})
    assert ce["fog"] == pytest.approx(fog) and "saturate" not in ce
    assert mce == pytest.approx(sum(100 * sum(errors[c]) / (5 * ALEXNET_ERR[c]) for c in errors) / 15)
    partial, _ = mce_vs_alexnet({c: e for c, e in errors.items() if c != "snow"})
    assert np.isnan(partial)  # the benchmark's mCE is over all 15: never over fewer


def test_report_shows_both_mces_and_says_which(tmp_path, capsys):
    """Supervised and ours on the published ImageNet-C files: the relative CE (Supervised = 100)
    and beside it the AlexNet-normalised one, each computed here by hand from the stored rows."""
    acc = {"supervised": 0.5, "ours": 0.6}
    for method, base in acc.items():
        rows = [{"distortion": c, "severity": s, "acc1": base - 0.05 * s - 0.01 * i}
                for i, c in enumerate(BENCHMARK_CORRUPTIONS) for s in benchmarks.LEVELS]
        write_run(tmp_path, f"c/{method}", {"suite": "imagenet_c", "rows": rows}, task="evaluate",
                  method=method, experiment="eval", extra={"suite": "imagenet_c"})
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout")
    err = {m: {c: [1 - (b - 0.05 * s - 0.01 * i) for s in benchmarks.LEVELS]
               for i, c in enumerate(BENCHMARK_CORRUPTIONS)} for m, b in acc.items()}
    rel = section(out.out, "ImageNet-C (published files): corruption error (mCE), relative to Supervised")
    _, cells = parse_table(rel)
    fog_rel = 100 * sum(err["ours"]["fog"]) / sum(err["supervised"]["fog"])
    assert cells["fog"]["Ours"] == f"{fog_rel:.1f}" and cells["mCE"]["Supervised"] == "100.0"
    alexnet = section(out.out, "ImageNet-C (published files): corruption error vs AlexNet")
    header, cells = parse_table(alexnet)
    assert header == ["Corruption", "Supervised", "Ours"] and list(cells)[-1] == "mCE"
    assert cells["fog"]["Ours"] == f"{100 * sum(err['ours']['fog']) / (5 * 0.819324):.1f}"
    for method, name in (("ours", "Ours"), ("supervised", "Supervised")):
        hand = np.mean([100 * sum(e) / (5 * ALEXNET_ERR[c]) for c, e in err[method].items()])
        assert cells["mCE"][name] == f"{hand:.1f}"
    assert "AlexNet" not in rel and "AlexNet's errors are on the 1000-class" in alexnet  # footnotes


def test_benchmark_mce_needs_all_15_and_cifar_is_unnormalised(tmp_path, capsys):
    """CIFAR-10-C's table is the unnormalised mean error; a model lacking a corruption has its
    CEs but no mCE, and the table says which corruption it lacks."""
    for method, base in {"supervised": 0.5, "ours": 0.6}.items():
        rows = [{"distortion": c, "severity": s, "acc1": base - 0.05 * s}
                for c in BENCHMARK_CORRUPTIONS if not (method == "ours" and c == "snow")
                for s in benchmarks.LEVELS]
        write_run(tmp_path, f"c/{method}", {"suite": "cifar10c", "rows": rows}, task="evaluate",
                  method=method, experiment="eval", data="cifar10", extra={"suite": "cifar10c"})
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout")
    sec = section(out.out, "CIFAR-10-C (published files): mean corruption error, unnormalised")
    _, cells = parse_table(sec)
    hand = 100 * np.mean([1 - (0.5 - 0.05 * s) for s in benchmarks.LEVELS])
    assert cells["fog"]["Supervised"] == cells["mCE"]["Supervised"] == f"{hand:.1f}"
    assert cells["snow"]["Ours"] == cells["mCE"]["Ours"] == "—" and cells["fog"]["Ours"] != "—"
    assert "Ours (no benchmark mCE: lacks snow at some severity 1-5)" in sec
    assert "as CIFAR-10-C / CIFAR-100-C report it" in sec and "error vs AlexNet" not in out.out
