"""W&B: online with credentials, offline with a one-line notice without; one run id per run folder;
a multirun with W&B on finishes every run (``wandb.finish``) instead of hanging on the first;
``distortkd-report --wandb`` logs its tables and figures to one run (the real package, offline)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch.loggers
import pytest
from test_cli import TINY, _compose
from test_report import PNG, PRESETS, acc, parse_table, section, write_run

from distortkd import report
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


def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B; the real package here
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wb").mkdir()


def _report_runs(root: Path) -> None:
    """Fine-tunes of two methods × two presets: table 1, table 3 and the label figure."""
    for method in ("supervised", "ours"):
        for dist in PRESETS[:2]:
            value = acc(method, dist, 0)
            write_run(root, f"{method}/{dist}", {"test/acc1": value, "val/acc1": value - 0.05},
                      method=method, distortion=dist)


def test_report_logs_every_table_and_figure_to_one_offline_run(monkeypatch, tmp_path, capsys):
    _offline_env(monkeypatch, tmp_path)
    _report_runs(tmp_path / "runs")
    out = tmp_path / "table1_report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--wandb", "distortkd-test"]) == 0
    printed = capsys.readouterr()
    assert printed.err.splitlines() == [f"wandb: no API key configured; logging offline to "
                                        f"{tmp_path / 'wb' / 'wandb'} (sync later with `wandb sync`)"]
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    assert run.name.endswith("-" + run_id(out))  # the report folder's own run id
    md = (out / "results.md").read_text()
    titles = re.findall(r"^## (Table \d+)", md, re.M)
    assert titles == ["Table 1", "Table 3"]
    for title in titles:  # each table, cell for cell as results.md shows it
        header, cells = parse_table(section(md, title))
        (logged,) = (run / "files" / "media" / "table" / "tables").glob(
            f"table{title.split()[1]}_*.table.json")
        table = json.loads(logged.read_text())
        assert table["columns"] == header
        assert {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in table["data"]} == cells
    figures = re.findall(r"^- `(\w+)\.png`", section(md, "Figures"), re.M)
    assert figures == ["labels"]
    (image,) = (run / "files" / "media" / "images" / "figures").glob("labels_*.png")
    assert image.read_bytes()[:8] == PNG
    assert (run / "files" / "results.md").read_text() == md
    # The W&B service process writes the record file; it flushes it for sure when it shuts down,
    # which a CLI's exit does (a test's process lives on: under load the file was still only its
    # header once).
    import wandb

    wandb.teardown()
    history = (run / f"run-{run_id(out)}.wandb").read_bytes()  # the run's records, as synced
    for key in (b"tables/table1", b"tables/table3", b"figures/labels", b"table1_report"):
        assert key in history


def test_report_refuses_a_bad_wandb_project_before_any_work(monkeypatch, tmp_path, capsys):
    _offline_env(monkeypatch, tmp_path)
    _report_runs(tmp_path / "runs")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--wandb", "team/project"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("distortkd-report: error: W&B project 'team/project'") and "accepted" in line
    assert not out.exists() and not list((tmp_path / "wb").iterdir())
