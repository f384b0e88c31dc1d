"""W&B: online with credentials, offline with a one-line notice without; one run id per run folder;
a multirun with W&B on finishes every run (``wandb.finish``) instead of hanging on the first."""

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch.loggers
import pytest
from test_cli import TINY, _compose

from distortkd.wandb_utils import make_wandb_logger, run_id

BIN = Path(sys.executable).parent


class _FakeWandbLogger:
    """Records the arguments the real ``WandbLogger`` would get (no network here)."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        self.calls.append(kwargs)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    _FakeWandbLogger.calls = []
    monkeypatch.setattr(lightning.pytorch.loggers, "WandbLogger", _FakeWandbLogger)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return _FakeWandbLogger.calls


def test_online_with_an_api_key_grouped_tagged_and_one_id_per_run_folder(fake, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    cfg = _compose("distill", [*TINY, "logger=wandb", "distortion=noise_strong"])
    for _ in range(2):  # a resumed run builds its logger again
        make_wandb_logger(cfg, tmp_path / "run")
    first, again = fake
    assert first["offline"] is False and first["resume"] == "allow"
    assert first["id"] == again["id"] == run_id(tmp_path / "run")
    assert first["group"] == "test" and first["tags"][:2] == ["noise_strong", "multilevel"]
    assert first["project"] == "distortkd" and first["name"] == "run" and first["save_dir"] == str(tmp_path / "run")
    make_wandb_logger(cfg, tmp_path / "other")
    assert fake[-1]["id"] != first["id"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["no key", "netrc without wandb", "offline=true"])
def test_offline_without_credentials_or_when_asked(fake, monkeypatch, tmp_path, capsys, how):
    overrides = [*TINY, "logger=wandb"]
    if how == "netrc without wandb":
        (tmp_path / "no-netrc").write_text("machine example.org login a password b\n")
    if how == "offline=true":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        overrides.append("logger.offline=true")
    make_wandb_logger(_compose("distill", overrides), tmp_path / "run")
    assert fake[0]["offline"] is True
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ([] if how == "offline=true" else [err[0]]) and all("offline" in line for line in err)


def test_netrc_login_counts_as_credentials(fake, tmp_path):
    (tmp_path / "no-netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    make_wandb_logger(_compose("distill", [*TINY, "logger=wandb"]), tmp_path / "run")
    assert fake[0]["offline"] is False


@pytest.mark.slow
def test_real_offline_multirun_finishes_every_run(tmp_path):
    """The real wandb package, offline: both jobs of a sweep log to their own run id and exit."""
    env = {**os.environ, "DISTORTKD_RUNS": str(tmp_path / "runs"), "HOME": str(tmp_path), "CI": "1",
           "NETRC": str(tmp_path / "none"), "WANDB_API_KEY": ""}
    env.pop("WANDB_API_KEY")
    proc = subprocess.run([str(BIN / "distortkd-distill"), "-m", *TINY, "logger=wandb", "trainer.max_epochs=1",
                           "seed=0,1"], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("wandb: no API key configured; logging offline") == 2
    runs = sorted(p for p in (tmp_path / "runs" / "test" / "distill").iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "metrics.json").is_file()
        (offline,) = (run / "wandb").glob("offline-run-*")
        assert offline.name.endswith("-" + run_id(run))
