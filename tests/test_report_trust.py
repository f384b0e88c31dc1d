"""The report never pools different settings and never hides a run it leaves out."""

from __future__ import annotations

import json
import math
import re
import statistics

import pandas as pd
import pytest
from omegaconf import OmegaConf
from test_report import _layout_runs, acc, parse_table, run_report, section, write_run

from distortkd import figures, report
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


def _heldout_run(root, name, method, base, seed=0, extra=(), **fields):
    """An evaluate run on the held-out suite: fog and snow at severities 1-2, accuracy from ``base``;
    ``ckpt`` resolved as the CLI stores it (a path that names the method and the seed)."""
    rows = [{"distortion": c, "severity": s, "acc1": base - 0.1 * s - 0.02 * seed - 0.05 * i}
            for i, c in enumerate(("fog", "snow")) for s in (1, 2)]
    ckpt = f"{root}/eval/finetune/{method}_{fields.get('fraction', 1.0)}_s{seed}/checkpoints/best.ckpt"
    return write_run(root, name, {"suite": "heldout", "rows": rows}, task="evaluate", method=method,
                     seed=seed, experiment="eval", extra={"ckpt": ckpt, **dict(extra)}, **fields)


def _ce(rows, student, baseline, corruption):
    """CE of ``student`` against ``baseline`` ({(corruption, severity, seed): acc}) as ImageNet-C."""
    err = lambda r: sum(1 - statistics.mean(v for (c, s, _), v in r.items() if (c, s) == (corruption, sev))  # noqa: E731
                        for sev in (1, 2))
    return 100 * err(rows[student]) / err(rows[baseline])


def test_mce_baseline_is_the_supervised_run_of_the_same_setting(tmp_path, capsys):
    """Supervised and ours at 10 % and at 100 % labels: each student is measured against the
    supervised runs of its own label fraction; ours at 50 % has none and is listed."""
    accs = {("supervised", 0.1): 0.6, ("supervised", 1.0): 0.8, ("ours", 0.1): 0.7,
            ("ours", 1.0): 0.85, ("ours", 0.5): 0.75}
    rows = {}
    for (method, frac), base in accs.items():
        for seed in (0, 1):
            run = _heldout_run(tmp_path, f"{method}{frac}_s{seed}", method, base, seed, fraction=frac)
            for r in json.loads((run / "metrics.json").read_text())["rows"]:
                rows.setdefault((method, frac), {})[r["distortion"], r["severity"], seed] = r["acc1"]
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout")
    _, cells = parse_table(section(md, "Held-out corruptions: corruption error"))
    # the fraction tells the columns apart (the ckpt path, which names it too, may also be shown)
    col = lambda m, f: next(c for c in cells["mCE"] if c.startswith(m) and f"data.label_fraction={f}" in c)  # noqa: E731
    for frac in (0.1, 1.0):
        assert cells["mCE"][col("Supervised", frac)] == "100.0"
        want = _ce(rows, ("ours", frac), ("supervised", frac), "fog")
        assert cells["fog"][col("Ours", frac)] == f"{want:.1f}"
    assert not any(c.startswith("Ours") and "fraction=0.5" in c for c in cells["mCE"])
    left = section(md, "Left out")
    assert "ours0.5_s0`: mCE: no supervised run of its setting but method/init" in left
    assert "ours0.1_s0`" not in left and "supervised1.0_s1`" not in left
    assert re.search(r"- Ours \[.*data.label_fraction=0.5.*\] \(no mCE: no single supervised baseline", md)


def test_mce_never_merges_two_candidate_baselines(tmp_path, capsys):
    """Two supervised runs that differ in their init only are both candidates: neither is used."""
    _heldout_run(tmp_path, "sup_hub", "supervised", 0.6, extra={"init": "pretrained"})
    _heldout_run(tmp_path, "sup_ckpt", "supervised", 0.8, extra={"init": "other.ckpt"})
    _heldout_run(tmp_path, "ours", "ours", 0.7, extra={"init": "auto"})
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout")
    _, cells = parse_table(section(md, "Held-out corruptions: corruption error"))
    assert set(cells["mCE"].values()) == {"100.0"}  # each supervised run against itself only
    assert not any(c.startswith("Ours") for c in cells["mCE"])
    assert ("ours`: mCE: 2 candidate supervised baselines of different settings (key init: "
            "other.ckpt vs pretrained), never merged (heldout)") in section(md, "Left out")


def _setting_without(setting, key):
    return json.dumps({k: v for k, v in json.loads(setting).items() if k != key}, sort_keys=True)


def test_figures_draw_one_curve_per_setting(tmp_path, capsys, monkeypatch):
    """Ours with noise σ 0.5 and σ 0.05 at three label fractions and in evaluate runs: two
    curves each, labelled like table rows, every curve of one setting (but its x)."""
    for i, sigma in enumerate((0.5, 0.05)):
        for seed in (0, 1):
            for frac in (0.01, 0.1, 1.0):
                write_run(tmp_path, f"f{sigma}/{seed}/{frac}", {"test/acc1": 0.3 + frac / 2 + 0.1 * i},
                          distortion="noise_strong", params={"sigma": sigma}, seed=seed, fraction=frac)
            rows = [{"distortion": "gaussian_noise", "severity": s, "acc1": 0.9 - s / 2 - 0.1 * i}
                    for s in (0.25, 0.5)]
            write_run(tmp_path, f"e{sigma}/{seed}", {"suite": "paper", "rows": rows}, task="evaluate",
                      seed=seed, distortion="noise_strong", params={"sigma": sigma}, experiment="eval")
    drawn = {}
    for name in ("labels_figure", "severity_figure"):
        draw = getattr(figures, name)
        monkeypatch.setattr(figures, name, lambda df, *a, _d=draw, _n=name, **k: drawn.setdefault(_n, df) is df
                            and _d(df, *a, **k))
    _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "fig2,fig3")
    for name, panel, x in (("labels_figure", "distortion.name", "data.label_fraction"),
                           ("severity_figure", "distortion", None)):
        df = drawn[name]
        settings = df["setting"].map(lambda s, x=x: _setting_without(s, x))
        assert settings.nunique() == 2, name  # the data holds both settings ...
        assert settings.groupby([df[panel], df["curve"]]).nunique().eq(1).all(), name  # ... never on one curve
        assert sorted(df["curve"].unique()) == ["Ours [distortion.params.sigma=0.05]",
                                                "Ours [distortion.params.sigma=0.5]"], name
    assert (tmp_path / "out" / "labels.png").is_file() and (tmp_path / "out" / "severity.png").is_file()


def test_non_finite_values_of_evaluate_rows_are_listed(tmp_path, capsys):
    rows = [{"distortion": "fog", "severity": 1, "acc1": math.nan},
            {"distortion": "fog", "severity": 2, "acc1": 0.5, "cos_cls": math.inf},
            {"distortion": "snow", "severity": 1, "acc1": None}]
    write_run(tmp_path, "bad", {"suite": "heldout", "rows": rows}, task="evaluate", experiment="eval")
    write_run(tmp_path, "good", {"suite": "heldout", "rows": [{"distortion": "fog", "severity": 1, "acc1": 0.7}]},
              task="evaluate", experiment="eval", seed=1)
    md = _report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout")
    left = section(md, "Left out")
    for where, what in (("fog / 1", "`acc1` is nan"), ("fog / 2", "`cos_cls` is inf"),
                        ("snow / 1", "`acc1` is null")):
        assert f"evaluate row {where}: {what}" in left
    assert "good`: evaluate row" not in left
    _, cells = parse_table(section(md, "Held-out corruptions: accuracy"))
    assert cells["fog / 1"]["Ours"] == "70.0"  # the NaN row is kept out of the mean
