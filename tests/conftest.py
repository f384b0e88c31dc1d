"""Shared fixtures: tiny random-init models, nothing downloaded."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Tiny models on the 2-core CI machine run ~10x faster on one thread than on two (OpenMP's
# spin-waiting costs more than the parallelism gains); subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def tiny_vit():
    from distortkd.vit import build_vit

    torch.manual_seed(0)
    return build_vit("vit_tiny_patch16_224", pretrained=False, **TINY_VIT)


# The built wheel and its installed copy: shared by tests/test_install.py and the README walkthrough
# (tests/test_walkthrough.py), built once a session.
SOURCE = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> None:
    # --no-index: nothing is fetched; --no-build-isolation builds with the venv's own setuptools
    # (always there: the pinned torch requires setuptools >= 77, which builds wheels on its own)
    subprocess.run([sys.executable, "-m", "pip", "-q", *args, "--no-deps", "--no-index"],
                   check=True, capture_output=True)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (an in-tree build would leave build/ and
    *.egg-info in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(SOURCE / name, tmp / name)
    shutil.copytree(SOURCE / "distortkd", tmp / "distortkd",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-build-isolation", "-w", str(tmp / "dist"), str(tmp))
    (found,) = (tmp / "dist").glob("distortkd-*.whl")
    return found


@pytest.fixture(scope="session")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own, console scripts in ``site/bin``."""
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--target", str(target), str(wheel))
    return target


# The two longest tests (FAST study ~200 s, FAST demo ~130 s with 2 workers).
LONGEST = ("test_fast_study_end_to_end", "test_fast_demo_report_matches_run_folders")


def _rank(item) -> int:
    return 0 if item.name in LONGEST else 1 if item.get_closest_marker("slow") else 2


def pytest_collection_modifyitems(config, items):
    """Orders the suite for ``make test``'s two workers (xdist ``--dist worksteal``, which gives
    worker 0 the first half of the list and worker 1 the second, then moves queued tests from the
    longer queue's tail to an idle worker): each half starts with half of the long tests, taken
    alternately in order of length, so both workers run them first and the short tests balance
    the end. Serially, the order changes nothing."""
    heavy = sorted((i for i in items if _rank(i) < 2), key=_rank)
    light = [i for i in items if _rank(i) == 2]
    first, second = heavy[0::2], heavy[1::2]
    cut = max(0, len(items) // 2 - len(first))
    items[:] = first + light[:cut] + second + light[cut:]
