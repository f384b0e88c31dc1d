"""distortkd from a built wheel: its configs ship inside it, a CLI runs from an empty folder against
the installed copy (not this source tree), and a user's own config folder composes with ours."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from distortkd import cli

SOURCE = Path(cli.__file__).resolve().parents[1]
TINY = ["data=fashion_mnist", "data.limit_train=64", "data.limit_eval=64", "data.batch_size=16"]
# A user's config folder: one option per group, each extending one of ours with other values.
USER_CONFIGS = {
    "data/mydata.yaml": "defaults:\n  - fashion_mnist\nlimit_train: 48\nlimit_eval: 32\nbatch_size: 16\n",
    "distortion/mydist.yaml": "defaults:\n  - noise_strong\nname: mydist\nparams:\n  sigma: 0.3\n",
    "model/mymodel.yaml": "defaults:\n  - vit_tiny_test\ntag: mymodel\ntimm_kwargs: {embed_dim: 48}\n",
    "experiment/myexp.yaml": ("# @package _global_\ndefaults:\n  - override /trainer: cpu\n"
                              "  - override /logger: csv\nexperiment: myexp\nseed: 3\n"
                              "trainer:\n  max_epochs: 1\n"),
}
USER_CHOICES = ["data=mydata", "distortion=mydist", "model=mymodel", "experiment=myexp"]


def _installed(site: Path, tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    """``command`` from an empty folder, importing only the installed copy."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(site), "DISTORTKD_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _user_dir(tmp_path: Path) -> Path:
    user = tmp_path / "user_conf"
    for name, text in USER_CONFIGS.items():
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(text)
    return user


def _only_metrics(tmp_path: Path) -> dict:
    (path,) = (tmp_path / "runs").rglob("metrics.json")
    return json.loads(path.read_text())


def test_wheel_ships_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    ours = sorted(p.relative_to(SOURCE).as_posix() for p in Path(cli.CONF).rglob("*.yaml"))
    assert "distortkd/conf/distill.yaml" in names
    assert {Path(n).parent.as_posix() for n in ours} <= {Path(n).parent.as_posix() for n in names}
    assert [n for n in ours if n not in names] == []


def test_installed_copy_is_the_one_imported(site, tmp_path):
    # find_spec locates the CLI module (whose folder holds the configs) without importing torch
    probe = _installed(site, tmp_path, [sys.executable, "-c", "import distortkd, importlib.util as u; "
                                        "print(distortkd.__file__); print(u.find_spec('distortkd.cli').origin)"])
    assert probe.returncode == 0, probe.stderr
    files = [Path(line).resolve() for line in probe.stdout.split()]
    assert len(files) == 2 and all(f.is_relative_to(site.resolve()) for f in files), files  # not the source tree
    assert (files[1].parent / "conf" / "distill.yaml").is_file()


@pytest.mark.slow  # a whole training run: ~6 s on an idle 2-core VM, 17 s under load
def test_installed_console_script_runs_from_an_empty_folder(site, tmp_path):
    done = _installed(site, tmp_path, [str(site / "bin" / "distortkd-distill"), "experiment=test", *TINY])
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = _only_metrics(tmp_path)
    assert metrics["status"] == "ok" and metrics["config"]["experiment"] == "test"
    assert list((tmp_path / "cwd").iterdir()) == []  # Hydra wrote nothing into the working folder


@pytest.mark.slow  # a whole training run: ~6 s on an idle 2-core VM, 17 s under load
def test_user_config_dir_composes_with_ours(site, tmp_path):
    user = _user_dir(tmp_path)
    done = _installed(site, tmp_path, [str(site / "bin" / "distortkd-distill"),
                                       "--config-dir", str(user), *USER_CHOICES])
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = _only_metrics(tmp_path)
    cfg = metrics["config"]
    assert metrics["status"] == "ok" and cfg["experiment"] == "myexp" and cfg["seed"] == 3
    assert cfg["distortion"] == {"name": "mydist", "family": "gaussian_noise", "params": {"sigma": 0.3}}
    assert cfg["model"]["timm_kwargs"]["embed_dim"] == 48 and cfg["model"]["timm_kwargs"]["depth"] == 2
    assert cfg["data"]["limit_train"] == 48 and cfg["data"]["name"] == "fashion_mnist"
    assert cfg["loss"]["name"] == "multilevel"  # groups the user did not touch keep our defaults


def test_user_searchpath_composes_with_ours(site, tmp_path):
    user = _user_dir(tmp_path)
    done = _installed(site, tmp_path, [sys.executable, "-m", "distortkd.cli", "distill",
                                       f"hydra.searchpath=[file://{user}]", *USER_CHOICES,
                                       "--cfg", "job", "--resolve"])
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = yaml.safe_load(done.stdout)
    assert cfg["run_name"] == "fashion_mnist_mymodel_mydist_multilevel_s3"
    assert cfg["distortion"]["params"]["sigma"] == 0.3 and cfg["data"]["limit_eval"] == 32
    assert cfg["trainer"]["accelerator"] == "cpu"  # the user's experiment overrode our trainer group
