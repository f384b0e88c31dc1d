"""README "Use it on your own images": its ``bash walkthrough`` block, run line by line as it
stands (bash, the console scripts of the installed wheel first on PATH, importing only that
installed copy: a non-editable install, as a user gets from ``pip install``) from an empty folder, with tiny settings
appended to the training commands; on generated image folders and on real Fashion-MNIST PNGs.

The block is read from the README, not copied here, so the README cannot drift from what is
tested. The only change to its commands: tiny settings (``model=vit_tiny_test``, CPU, one short
epoch; for the evaluation a blur grid that fits 32 px images) are appended to
``distortkd-distill/finetune/evaluate`` lines (Hydra takes the last value of a key). The weights file and the folders are written where the block's commands read them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch
from conftest import TINY_VIT
from safetensors.torch import save_file
from test_own_data import CLASSES, FMNIST, fashion_mnist_tree, write_tree

from distortkd.export import load_exported
from distortkd.vit import Encoder

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING = ("distortkd-distill", "distortkd-finetune", "distortkd-evaluate")
STEPS = [*TRAINING, "distortkd-export", "distortkd-embed"]
TINY = ["model=vit_tiny_test", "trainer=cpu", "trainer.max_epochs=1", "data.num_workers=0",
        "data.batch_size=16", "data.eval_batch_size=64", "data.limit_train=64", "data.limit_eval=64"]
# The paper's blur grid reaches σ 17 px: a kernel wider than the tiny model's 32 px images.
SMALL_GRID = ["severities.gaussian_blur=[1,5]"]


def walkthrough() -> list[str]:
    """The command lines of the README's one ``bash walkthrough`` block (comment lines dropped)."""
    (block,) = re.findall(r"^```bash walkthrough\n(.*?)^```$", README.read_text(), re.S | re.M)
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    # A trailing comment or a continuation would swallow the appended settings or split a command.
    assert not [line for line in lines if " #" in line or line.endswith("\\")], "one command a line"
    return lines


def argument(lines: list[str], program: str, key: str) -> str:
    """The value of ``key=`` on the block's ``program`` line."""
    (line,) = [line for line in lines if line.startswith(program + " ")]
    (value,) = [t.split("=", 1)[1] for t in shlex.split(line) if t.startswith(key + "=")]
    return value


def tiny_weights(path: Path) -> None:
    """A random tiny ViT's state dict as safetensors: the user's local weights file, in miniature."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(path))


def generated(unlabelled: Path, labelled: Path) -> None:
    write_tree(unlabelled, {".": 48}, size=40)
    # 40 a class: 5 % of what is left after the 10 % val split still keeps every class
    write_tree(labelled, {f"train/{c}": 40 for c in CLASSES} | {f"test/{c}": 4 for c in CLASSES})


def fashion_mnist(unlabelled: Path, labelled: Path) -> None:
    from distortkd.sources import read_idx_split

    fashion_mnist_tree(labelled, per_class=30)  # 300 train, 100 test PNGs in class folders
    images, _ = read_idx_split(FMNIST, "train")
    unlabelled.mkdir(parents=True)
    for i in range(len(images) - 200, len(images)):  # 200 others, no labels
        PIL.Image.fromarray(images[i]).save(unlabelled / f"{i}.png")


def run_step(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    program = line.split()[0]
    tiny = [*TINY, *SMALL_GRID] if program == "distortkd-evaluate" else TINY if program in TRAINING else []
    return subprocess.run(["bash", "-c", " ".join([line, *tiny])], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def the_run(root: Path, task: str) -> dict:
    (run,) = [p for p in (root / "runs" / "default" / task).iterdir() if p.is_dir()]
    return json.loads((run / "metrics.json").read_text())


def check_step(program: str, args: list[str], cwd: Path, results: dict) -> None:
    """What each step must have written."""
    if program in TRAINING:
        metrics = results[program] = the_run(cwd, program.removeprefix("distortkd-"))
        assert metrics["status"] == "ok", metrics.get("error")
    elif program == "distortkd-export":
        encoder = load_exported(cwd / args[-1])
        assert isinstance(encoder, Encoder) and encoder(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    elif program == "distortkd-embed":
        images = [p for p in (cwd / args[1]).rglob("*") if p.suffix in (".png", ".jpg")]
        rows = np.load(cwd / args[2])
        files = (cwd / args[2]).with_suffix(".files.txt").read_text().splitlines()
        assert rows.shape == (len(images), 32) and np.isfinite(rows).all()
        assert sorted((cwd / f).resolve() for f in files) == sorted(p.resolve() for p in images)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["generated", "fashion_mnist"])
def test_readme_walkthrough_runs_as_written(tmp_path, data, site):
    if data == "fashion_mnist" and not FMNIST.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist not installed")
    lines = walkthrough()
    programs = [line.split()[0] for line in lines if line.startswith("distortkd-")]
    assert programs == STEPS  # every step, in order, once
    tiny_weights(tmp_path / argument(lines, "distortkd-distill", "model.weights_file"))
    make = generated if data == "generated" else fashion_mnist
    make(tmp_path / argument(lines, "distortkd-distill", "data.path"),
         tmp_path / argument(lines, "distortkd-finetune", "data.path"))
    env = {**os.environ, "PATH": f"{site / 'bin'}{os.pathsep}{os.environ['PATH']}", "CI": "1",
           "PYTHONPATH": str(site)}  # the installed wheel, not this source tree
    env.pop("DISTORTKD_RUNS", None)  # the README's default: ./runs
    for program in STEPS:
        assert shutil.which(program, path=env["PATH"]) == str(site / "bin" / program)
    results = {}
    for line in lines:
        proc = run_step(line, tmp_path, env)
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
        if line.startswith("distortkd-"):
            check_step(line.split()[0], shlex.split(line)[1:], tmp_path, results)
    tuned = results["distortkd-finetune"]
    assert tuned["config"]["data"]["label_fraction"] == 0.05
    assert "runs/default/distill/" in tuned["config"]["provenance"]["init"]["path"]  # init=auto
    assert tuned["config"]["distortion"]["family"] == "compose"
    assert np.isfinite(results["distortkd-evaluate"]["mean_acc1"])
