"""The report never pools different settings and never hides a run it leaves out."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from omegaconf import OmegaConf
from test_report import _layout_runs, acc, parse_table, run_report, section, write_run

from distortkd import report
from distortkd.runs import load_runs
from distortkd.tables import pivot_table


def _report(capsys, *args):
    code, out = run_report(capsys, *args)
    assert code == 0, out.err
    return out.out


def test_runs_that_differ_in_a_setting_are_not_pooled(tmp_path, capsys):
    """Two run roots, both ``noise_strong``, one with σ 0.5 (2 seeds), one with σ 0.05."""
    a, b = tmp_path / "a", tmp_path / "b"
    for seed in (0, 1):
        write_run(a, f"ours{seed}", {"test/acc1": 0.60 + 0.02 * seed}, distortion="noise_strong",
                  seed=seed, params={"sigma": 0.5})
    write_run(a, "sup", {"test/acc1": 0.50}, method="supervised", distortion="noise_strong",
              params={"sigma": 0.5})
    write_run(b, "ours0", {"test/acc1": 0.90}, distortion="noise_strong", params={"sigma": 0.05})
    md = _report(capsys, a, b, "--out", tmp_path / "out", "--only", "table1")
    sec = section(md, "Table 1")
    _, cells = parse_table(sec)
    strong, weak = (f"noise_strong [distortion.params.sigma={s}]" for s in (0.5, 0.05))
    assert set(cells) == {strong, weak}
    assert cells[strong] == {"Supervised": "50.0", "Ours": "61.0 ± 1.4"}  # σ 0.5 lines up
    assert cells[weak] == {"Supervised": "—", "Ours": "90.0"}  # one seed, not "mean of 3"
    assert "over 2 seeds; 2 cell(s) have fewer" in sec and "never pooled" in sec


def test_pivot_never_pools_two_settings_and_names_the_conflict():
    setting = lambda s: json.dumps({"distortion.params.sigma": s})  # noqa: E731
    df = pd.DataFrame({"status": ["ok"] * 3, "path": ["p0", "p1", "q0"], "seed": [0, 1, 0],
                       "r": ["noise_strong"] * 3, "c": ["ours"] * 3, "v": [0.6, 0.62, 0.9],
                       "setting": [setting(0.5), setting(0.5), setting(0.05)]})
    piv = pivot_table(df, "r", "c", "v")
    assert math.isnan(piv.mean.at["noise_strong", "ours"]) and piv.n.at["noise_strong", "ours"] == 0
    reasons = dict(piv.left_out)
    assert set(reasons) == {"p0", "p1", "q0"}
    assert reasons["q0"] == ("conflicts with 2 other runs in cell noise_strong × ours: differs in "
                             "key distortion.params.sigma (0.5 vs 0.05)")


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_a_finished_run_without_a_finite_metric_is_left_out_and_listed(tmp_path, capsys, bad):
    write_run(tmp_path, "good", {"status": "ok", "test/acc1": 0.6})
    # val/acc1 must not stand in for a test/acc1 that the run stored as non-finite
    write_run(tmp_path, "bad", {"status": "ok", "test/acc1": bad, "val/acc1": 0.1}, seed=1)
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(md, "Table 1"))
    assert cells == {"mask_strong": {"Ours": "60.0"}}  # neither averaged in nor replaced
    left = section(md, "Left out")
    shown = "null" if bad is None else str(bad)
    assert f"bad`: `test/acc1` is {shown} (table1)" in left and "good`" not in left


def test_a_finished_run_lacking_the_metric_is_listed(tmp_path, capsys):
    write_run(tmp_path, "good", {"status": "ok", "test/acc1": 0.6})
    write_run(tmp_path, "none", {"status": "ok", "train/loss": 0.3}, seed=1)
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    assert "none`: no `test/acc1` or `val/acc1` (table1)" in section(md, "Left out")


def test_failed_and_stopped_runs_are_listed(tmp_path, capsys):
    write_run(tmp_path, "ok", {"status": "ok", "test/acc1": 0.6})
    write_run(tmp_path, "failed", {"status": "failed", "error": "loss is NaN at step 12"}, seed=1)
    write_run(tmp_path, "stopped", {"status": "stopped", "error": "SIGTERM"}, seed=2)
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    left = section(md, "Left out")
    assert "failed`: failed: loss is NaN at step 12" in left
    assert "stopped`: stopped: SIGTERM" in left
    assert "1 failed, 1 stopped" in md
    _, cells = parse_table(section(md, "Table 1"))
    assert cells == {"mask_strong": {"Ours": "60.0"}}


@pytest.mark.parametrize(("args", "words"), [
    (["--metric", "test/acc"], ["--metric 'test/acc'", "test/acc1", "val/acc1"]),
    (["--experiment", "tabel1"], ["--experiment 'tabel1'", "accepted: table1"]),
    (["--data", "imagenet"], ["--data 'imagenet'", "accepted: imagenet100"]),
    (["--layout", "papr"], ["papr", "paper"]),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, words):
    write_run(tmp_path, "r", {"test/acc1": 0.5, "val/acc1": 0.4})
    with pytest.raises(SystemExit) as exit_:  # argparse's own errors exit, ours return
        raise SystemExit(report.main([str(tmp_path), "--out", str(tmp_path / "out"), *args]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("distortkd-report: error:")
    assert all(w in err for w in words), err
    assert not (tmp_path / "out" / "results.md").exists()


def test_filters_that_match_no_run_together_are_an_error(tmp_path, capsys):
    write_run(tmp_path, "a", {"test/acc1": 0.5}, experiment="table1", data="imagenet100")
    write_run(tmp_path, "b", {"test/acc1": 0.5}, experiment="table2", data="cifar10")
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--experiment", "table1",
                           "--data", "cifar10")
    assert code == 2 and "no run matches" in out.err and out.out == ""


def test_a_run_whose_config_yaml_is_gone_reports_from_the_copy_in_metrics(tmp_path, capsys):
    run = write_run(tmp_path, "kept", {"test/acc1": 0.5})
    lost = write_run(tmp_path, "lost", None, seed=1)
    copy = OmegaConf.to_container(OmegaConf.load(lost / "config.yaml"))  # as the CLI stores it
    (lost / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc1": 0.7, "config": copy}))
    (lost / "config.yaml").unlink()
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(md, "Table 1"))
    assert cells == {"mask_strong": {"Ours": "60.0 ± 14.1"}}
    assert "Left out" not in md and run.is_dir()


def test_folders_without_a_readable_config_are_listed(tmp_path, capsys):
    write_run(tmp_path, "ok", {"test/acc1": 0.5})
    ckpt_only = tmp_path / "ckpt_only" / "checkpoints"
    ckpt_only.mkdir(parents=True)
    (ckpt_only / "last.ckpt").write_bytes(b"\0")
    (tmp_path / "metrics_only").mkdir()
    (tmp_path / "metrics_only" / "metrics.json").write_text(json.dumps({"status": "ok", "test/acc1": 0.9}))
    (tmp_path / "ok" / "checkpoints").mkdir()
    (tmp_path / "ok" / "checkpoints" / "last.ckpt").write_bytes(b"\0")
    (tmp_path / "ok" / "csv").mkdir()
    (tmp_path / "ok" / "csv" / "metrics.json").write_text("{}")  # inside a run: not a run
    runs = load_runs([tmp_path])
    assert sorted(p.rsplit("/", 1)[1] for p in runs["path"]) == ["ckpt_only", "metrics_only", "ok"]
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    left = section(md, "Left out")
    assert "ckpt_only`: failed: config.yaml missing/unreadable (no config.yaml); no metrics.json" in left
    assert "metrics_only`: failed: config.yaml missing/unreadable (no config.yaml)" in left
    _, cells = parse_table(section(md, "Table 1"))
    assert cells == {"mask_strong": {"Ours": "50.0"}}


def test_table3_builds_from_the_dataset_its_runs_used(tmp_path, capsys):
    for dist in ("mask_strong", "noise_strong", "blur_strong"):
        for loss in ("global", "multilevel"):
            write_run(tmp_path, f"t3/{dist}/{loss}", {"test/acc1": acc("ours", dist, 0, "fashion_mnist", loss)},
                      distortion=dist, loss=loss, experiment="table3", data="fashion_mnist")
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table3,table1")
    header, cells = parse_table(section(md, "Table 3"))
    assert header == ["Loss", "Random Mask", "Gaussian Noise", "Gaussian Blur"]
    want = 100 * acc("ours", "noise_strong", 0, "fashion_mnist", "global")
    assert cells["Global"]["Gaussian Noise"] == f"{want:.1f}"
    _, cells = parse_table(section(md, "Table 1"))
    assert cells["blur_strong"]["Ours"] == f"{100 * acc('ours', 'blur_strong', 0, 'fashion_mnist'):.1f}"


def test_one_table_per_dataset(tmp_path, capsys):
    _layout_runs(tmp_path)  # table3's runs are on imagenet100
    for dist in ("mask_strong", "noise_strong", "blur_strong"):
        write_run(tmp_path, f"fm/{dist}", {"test/acc1": 0.3}, distortion=dist, loss="global",
                  experiment="table3", data="fashion_mnist")
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table3")
    _, fm = parse_table(section(md, "Table 3: loss ablation, accuracy (%) (fashion_mnist)"))
    _, inet = parse_table(section(md, "Table 3: loss ablation, accuracy (%) (imagenet100)"))
    assert fm == {"Global": {"Random Mask": "30.0", "Gaussian Noise": "30.0", "Gaussian Blur": "30.0"}}
    assert inet["Global"]["Random Mask"] == f"{100 * acc('ours', 'mask_strong', 0, loss='global'):.1f}"


def test_settings_that_differ_in_many_keys_get_short_distinct_tags(tmp_path, capsys):
    for i, sigma in enumerate((0.5, 0.05)):
        write_run(tmp_path, f"r{i}", {"test/acc1": 0.5 + 0.1 * i}, distortion="noise_strong",
                  params={"sigma": sigma, "a": i, "b": i, "c": i})
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(md, "Table 1"))
    assert len(cells) == 2 and sorted(c["Ours"] for c in cells.values()) == ["50.0", "60.0"]
    assert all(label.startswith("noise_strong [distortion.params.a=") and "+1 keys #" in label
               for label in cells)
