"""distortkd-report rebuilds tables and figures from fake run folders (config.yaml + metrics.json)."""

from __future__ import annotations

import json
import re
import statistics

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from distortkd import report
from distortkd.paper import mce
from distortkd.runs import load_rows, load_runs
from distortkd.tables import pivot_table

PNG = b"\x89PNG\r\n\x1a\n"
PRESETS = ("mask_weak", "mask_strong", "noise_weak", "noise_strong", "blur_weak", "blur_strong")
FAMILY = {"mask": "mask", "noise": "gaussian_noise", "blur": "gaussian_blur", "mixed": "mixed"}


def write_run(root, name, metrics, **fields):
    """Writes ``root/name/config.yaml`` (the Hydra-resolved layout) and, unless None, metrics.json."""
    dist = fields.get("distortion", "mask_strong")
    cfg = {
        "task": fields.get("task", "finetune"),
        "experiment": fields.get("experiment", "table1"),
        "method": fields.get("method", "ours"),
        "seed": fields.get("seed", 0),
        "model": {"name": fields.get("model", "vit_small_patch16_224")},
        "data": {"name": fields.get("data", "imagenet100"), "label_fraction": fields.get("fraction", 1.0)},
        "distortion": {"name": dist, "family": FAMILY[dist.split("_")[0]]},
        "pretrain": {"data": fields.get("pretrain_data", fields.get("data", "imagenet100"))},
    }
    if "loss" in fields:
        cfg["loss"] = {"name": fields["loss"]}
    if "params" in fields:
        cfg["distortion"]["params"] = fields["params"]
    cfg.update(fields.get("extra", {}))  # other top-level settings (init, suite, ...)
    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def acc(method, dist, seed, data="imagenet100", loss="multilevel"):
    """A distinct, seed-dependent accuracy per cell so a wrong grouping changes the numbers."""
    m = ["ci", "supervised", "ours"].index(method)
    d = (list(PRESETS) + ["mixed"]).index(dist)
    extra = 0.001 * len(data) + 0.02 * ["multilevel", "global", "global_local", "global_attn"].index(loss)
    return round(0.40 + 0.1 * m + 0.013 * d + 0.017 * seed + extra, 4)


@pytest.fixture
def grid(tmp_path):
    """2 seeds of the table1 grid; CI × blur_strong never ran; ours × noise_weak seed 1 failed,
    ours × noise_strong seed 1 has no metrics.json. Returns (root, {(dist, method): [values]})."""
    root, values = tmp_path / "runs", {}
    for method in ("ci", "supervised", "ours"):
        for dist in PRESETS:
            for seed in (0, 1):
                if (method, dist) == ("ci", "blur_strong"):
                    continue
                name = f"{method}/{dist}/s{seed}"
                if (method, dist, seed) == ("ours", "noise_weak", 1):
                    write_run(root, name, {"status": "failed", "error": "CUDA OOM"},
                              method=method, distortion=dist, seed=seed)
                    continue
                metrics = None if (method, dist, seed) == ("ours", "noise_strong", 1) else {}
                if metrics is not None:
                    value = acc(method, dist, seed)
                    metrics = {"test/acc1": value, "val/acc1": value - 0.05}
                    values.setdefault((dist, method), []).append(value)
                ci = {"model": "clip_rn101", "loss": "contrastive"} if method == "ci" else {}
                write_run(root, name, metrics, method=method, distortion=dist, seed=seed, **ci)
    return root, values


def section(text, title):
    """The markdown section whose heading starts with ``title``."""
    parts = re.split(r"^## ", text, flags=re.M)
    return next(p for p in parts if p.startswith(title))


def parse_table(sec):
    """Pipe table → (header list, {row label: {column: cell}})."""
    lines = [ln for ln in sec.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip() for c in ln.strip("|").split(" | ")]  # noqa: E731
    header = split(lines[0])
    return header, {r[0]: dict(zip(header[1:], r[1:], strict=True)) for r in map(split, lines[2:])}


def run_report(capsys, *args):
    code = report.main([str(a) for a in args])
    return code, capsys.readouterr()


def test_load_runs_flattens_config_defaults_and_status(grid):
    root, _ = grid
    runs = load_runs([root])
    assert len(runs) == 3 * 6 * 2 - 2
    assert runs["status"].value_counts().to_dict() == {"ok": 32, "failed": 1, "missing": 1}
    ours = runs[runs["method"].eq("ours")]
    assert ours["loss.name"].eq("multilevel").all()  # absent loss → multilevel for ours
    assert runs["loss.name"][runs["method"].eq("supervised")].isna().all()
    assert runs["finetune.mode"].eq("full").all()
    assert {"test/acc1", "val/acc1", "path", "data.label_fraction"} <= set(runs.columns)
    failed = runs[runs["status"].eq("failed")].iloc[0]
    assert failed["error"] == "CUDA OOM" and failed["distortion.name"] == "noise_weak"


def test_every_setting_of_a_run_config_is_a_column(tmp_path):
    """The report reads whole configs: settings outside CONFIG_FIELDS (the optimizer, the teacher,
    a chain's steps) are columns a table can filter or pivot on, lists as JSON text."""
    steps = [{"family": "gaussian_blur", "params": {"sigma": 1.5}}]
    for lr in (1e-4, 3e-4):
        write_run(tmp_path, f"lr{lr}", {"test/acc1": 0.5}, params={"steps": steps},
                  extra={"optim": {"name": "ci", "optimizer": {"lr": lr}}, "teacher": {"name": "vitb16"}})
    runs = load_runs([tmp_path])
    assert sorted(runs["optim.optimizer.lr"]) == [1e-4, 3e-4]
    assert runs["optim.name"].eq("ci").all() and runs["teacher.name"].eq("vitb16").all()
    assert json.loads(runs["distortion.params.steps"].iloc[0]) == steps
    assert runs.groupby("optim.optimizer.lr")["test/acc1"].count().tolist() == [1, 1]


def test_hydra_subfolder_is_not_a_run(tmp_path):
    run = write_run(tmp_path, "r", {"test/acc1": 0.5})
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"task": "finetune"}), run / ".hydra" / "config.yaml")
    assert load_runs([tmp_path])["path"].tolist() == [str(run.resolve())]


def test_table1_cells_are_means_and_stds_of_metrics(grid, tmp_path, capsys):
    root, values = grid
    code, out = run_report(capsys, root, "--out", tmp_path / "out", "--only", "table1")
    assert code == 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert out.out == md  # printed as plain text when stdout is not a terminal
    header, cells = parse_table(section(md, "Table 1"))
    assert header == ["Distortion", "CI", "Supervised", "Ours"]
    assert md.count("## Table 1") == 1  # CI's own backbone does not split the table
    assert list(cells) == list(PRESETS)
    names = {"CI": "ci", "Supervised": "supervised", "Ours": "ours"}
    for dist, row in cells.items():
        for col, cell in row.items():
            vals = values.get((dist, names[col]))
            if vals is None:
                assert cell == "—"
                continue
            mean, *std = cell.split(" ± ")
            assert float(mean) == pytest.approx(100 * statistics.mean(vals), abs=0.051)
            if len(vals) > 1:
                assert float(std[0]) == pytest.approx(100 * statistics.stdev(vals), abs=0.051)
            else:
                assert std == []  # one seed: no std shown
    assert "over 2 seeds" in md and "`test/acc1` (32 runs)" in md


def test_missing_cell_and_failed_runs_are_listed(grid, tmp_path, capsys):
    root, _ = grid
    code, _ = run_report(capsys, root, "--out", tmp_path / "out", "--only", "table1")
    assert code == 0
    sec = section((tmp_path / "out" / "results.md").read_text(), "Table 1")
    _, cells = parse_table(sec)
    assert cells["blur_strong"]["CI"] == "—"
    missing = sec.split("Missing cells:")[1]
    assert "- blur_strong × CI (no run)" in missing
    assert cells["noise_weak"]["Ours"] != "—"  # seed 0 finished; seed 1 failed
    md = (tmp_path / "out" / "results.md").read_text()
    failed = section(md, "Left out")  # was "Failed or unfinished runs": one list of every run left out
    assert "ours/noise_weak/s1" in failed and "CUDA OOM" in failed
    assert "ours/noise_strong/s1" in failed and "no metrics.json" in failed


def test_a_cell_whose_only_run_failed_names_it(tmp_path, capsys):
    write_run(tmp_path, "a", {"test/acc1": 0.5}, method="ours", distortion="mask_weak")
    write_run(tmp_path, "b", None, method="supervised", distortion="mask_weak")
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    assert code == 0
    assert "mask_weak × Supervised (failed or unfinished:" in out.out


def test_metric_falls_back_to_val_acc1(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path, f"s{seed}", {"val/acc1": 0.6 + 0.1 * seed}, seed=seed)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(out.out, "Table 1"))
    assert cells["mask_strong"]["Ours"] == "65.0 ± 7.1"
    assert "`val/acc1` (2 runs)" in out.out


def test_pivot_table_keeps_order_counts_seeds_and_averages_reruns():
    df = pd.DataFrame({
        "status": ["ok"] * 5 + ["failed"], "path": list("abcdef"), "seed": [0, 1, 0, 0, 0, 1],
        "r": ["y", "y", "y", "x", "x", "x"], "c": ["m"] * 6, "v": [0.2, 0.4, 0.4, 0.5, 0.7, np.nan],
    })
    piv = pivot_table(df, "r", "c", "v", row_order=["y"])
    assert piv.mean.index.tolist() == ["y", "x"]
    assert piv.mean.at["y", "m"] == pytest.approx(0.35)  # seed 0 run twice → (0.3 + 0.4) / 2
    assert piv.n.at["y", "m"] == 2 and piv.n.at["x", "m"] == 1
    assert piv.failed == {("x", "m"): ["f"]}
    assert piv.formatted().at["x", "m"] == "60.0"


def _layout_runs(root):
    for dist in ("mask_strong", "noise_strong", "blur_strong"):
        for method in ("ci", "supervised", "ours"):
            for data in ("cifar10", "stl10"):
                write_run(root, f"t2/{method}/{dist}/{data}", {"test/acc1": acc(method, dist, 0, data)},
                          method=method, distortion=dist, data=data, experiment="table2",
                          pretrain_data="imagenet100")
        for loss in ("global", "global_local", "global_attn", "multilevel"):
            write_run(root, f"t3/{dist}/{loss}", {"test/acc1": acc("ours", dist, 0, loss=loss)},
                      distortion=dist, loss=loss, experiment="table3")


def test_table2_and_table3_layouts(tmp_path, capsys):
    _layout_runs(tmp_path)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table2,table3")
    header, cells = parse_table(section(out.out, "Table 2"))
    assert header == ["Method", "CIFAR-10", "STL-10"]
    assert list(cells)[:3] == ["CI (RM)", "Baseline (RM)", "Ours (RM)"]
    assert cells["Baseline (GN)"]["STL-10"] == f"{100 * acc('supervised', 'noise_strong', 0, 'stl10'):.1f}"
    header, cells = parse_table(section(out.out, "Table 3"))
    assert header == ["Loss", "Random Mask", "Gaussian Noise", "Gaussian Blur"]
    assert list(cells) == ["Global", "Gl. Local", "Gl. Attention", "Gl. Local Attention"]
    assert cells["Global"]["Gaussian Blur"] == f"{100 * acc('ours', 'blur_strong', 0, loss='global'):.1f}"


def test_ablation_students_stay_out_of_table1(tmp_path, capsys):
    _layout_runs(tmp_path)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(out.out, "Table 1"))
    assert cells["mask_strong"]["Ours"] == f"{100 * acc('ours', 'mask_strong', 0):.1f}"


def test_latex_is_booktabs(grid, tmp_path, capsys):
    root, _ = grid
    run_report(capsys, root, "--out", tmp_path / "out", "--only", "table1")
    tex = (tmp_path / "out" / "tables" / "table1.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "mask\\_weak" in tex and "$\\pm$" in tex and "--" in tex


def _eval_run(root, name, method, suite, rows, seed=0, dist="mask_strong"):
    return write_run(root, name, {"suite": suite, "rows": rows}, task="evaluate", method=method,
                     seed=seed, distortion=dist, experiment="eval")


def test_severity_labels_and_attention_pngs(tmp_path, capsys):
    for method in ("supervised", "ours"):
        for seed in (0, 1):
            rows = [{"distortion": fam, "severity": s, "acc1": 0.9 - s / 2 + 0.01 * seed}
                    for fam in ("mask", "gaussian_noise") for s in (0.25, 0.5, 0.75)]
            _eval_run(tmp_path, f"e/{method}/{seed}", method, "paper", rows, seed)
            for frac in (0.01, 0.1, 1.0):
                write_run(tmp_path, f"f/{method}/{seed}/{frac}", {"test/acc1": 0.3 + frac / 2},
                          method=method, seed=seed, fraction=frac)
    k, heads, rng = 2, 3, np.random.default_rng(0)
    maps = {key: rng.dirichlet(np.ones(16), (k, heads)).reshape(k, heads, 4, 4)
            for key in ("teacher_clean", "student")}  # baseline missing on purpose
    np.savez(tmp_path / "f" / "ours" / "0" / "0.01" / "attention.npz", input=rng.random((k, 3, 32, 32)),
             clean=rng.random((k, 3, 32, 32)), **maps)
    out = tmp_path / "out"
    code, _ = run_report(capsys, tmp_path, "--out", out, "--only", "fig2,fig3,fig4")
    assert code == 0
    for name in ("severity.png", "labels.png", "attention.png", "attention_heads.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


def test_bad_attention_file_skips_only_that_figure(tmp_path, capsys):
    run = write_run(tmp_path, "r", {"test/acc1": 0.5})
    np.savez(run / "attention.npz", student=np.zeros((1, 2, 4, 4)))
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1,attention")
    assert code == 0 and "`attention`: skipped" in out.out and "## Table 1" in out.out


def _heldout(tmp_path):
    accs = {"supervised": 0.7, "ours": 0.8}
    for method, base in accs.items():
        for seed in (0, 1):
            rows = [{"distortion": c, "severity": s, "acc1": base - 0.1 * s - 0.01 * seed - 0.05 * i,
                     "cos_cls": 0.5 + 0.1 * seed, "teacher_cos_cls": 0.2}
                    for i, c in enumerate(("fog", "snow")) for s in (1, 2, 3)]
            _eval_run(tmp_path, f"h/{method}/{seed}", method, "heldout", rows, seed)
    return load_rows([tmp_path])


def test_mce_of_supervised_is_exactly_100(tmp_path):
    rows = _heldout(tmp_path)
    ce, left = mce(rows)
    assert left == []  # both methods have the same setting but method: a baseline each
    assert (ce["Supervised"] == 100.0).all()
    sup = rows[rows["method"].eq("supervised") & rows["distortion"].eq("fog")]
    ours = rows[rows["method"].eq("ours") & rows["distortion"].eq("fog")]
    err = lambda r: (1 - r.groupby("severity")["acc1"].mean()).sum()  # noqa: E731
    assert ce.at["fog", "Ours"] == pytest.approx(100 * err(ours) / err(sup))
    assert ce.at["mCE", "Ours"] == pytest.approx(ce.loc[["fog", "snow"], "Ours"].mean())
    assert ce.at["mCE", "Ours"] < 100


def test_heldout_and_diagnostics_tables(tmp_path, capsys):
    _heldout(tmp_path)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "heldout,diagnostics")
    header, cells = parse_table(section(out.out, "Held-out corruptions: accuracy"))
    assert header == ["Corruption / severity", "Supervised", "Ours"]
    assert cells["fog / 1"]["Supervised"] == "59.5 ± 0.7"
    _, cells = parse_table(section(out.out, "Held-out corruptions: corruption error"))
    assert cells["mCE"]["Supervised"] == "100.0"
    header, cells = parse_table(section(out.out, "Diagnostics"))
    assert header == ["Model / distortion", "cos_cls"]
    assert cells["Ours / fog"]["cos_cls"] == "0.550 ± 0.071"
    assert cells["Teacher (distorted) / fog"]["cos_cls"] == "0.200 ± 0.000"


def test_demo_layout_tables(tmp_path, capsys):
    for seed in (0, 1):
        for dist in ("mask_strong", "mixed"):
            cos = {"val/cos_clean": 0.9 + 0.02 * seed, "val/cos_clean_baseline": 0.4}
            write_run(tmp_path, f"d/{dist}/{seed}", cos,
                      task="distill", distortion=dist, seed=seed, data="fashion_mnist")
            rows = [{"distortion": "mask", "severity": 0.9, "acc1": 0.7 + 0.1 * (dist == "mixed") + 0.02 * seed}]
            _eval_run(tmp_path, f"e/{dist}/{seed}", "ours", "paper", rows, seed, dist)
            for method in ("supervised", "ours"):
                write_run(tmp_path, f"f/{dist}/{method}/{seed}", {"test/acc1": acc(method, dist, seed)},
                          method=method, seed=seed, distortion=dist, fraction=0.1)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--layout", "demo")
    header, cells = parse_table(section(out.out, "Demo"))
    assert header == ["Distortion / labels", "Supervised", "Ours", "Δ Ours − Sup."]
    assert cells["mask_strong / 10%"]["Δ Ours − Sup."] == "+10.0"
    _, cells = parse_table(section(out.out, "Representation"))
    assert list(cells["mixed"].values()) == ["0.400 ± 0.000", "0.910 ± 0.014"]
    _, cells = parse_table(section(out.out, "Mixed vs per-distortion"))
    assert cells["Random Mask"] == {"Distilled on that family": "71.0 ± 1.4", "Distilled on mixed": "81.0 ± 1.4"}


def test_empty_tables_are_skipped_with_a_note(tmp_path, capsys):
    write_run(tmp_path, "d", {"val/cos_clean": 0.9}, task="distill")
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out")
    assert code == 0 and "`table1`: skipped, no matching runs" in out.out
    assert "## Table" not in out.out


def test_user_errors_are_one_line(tmp_path, capsys):
    write_run(tmp_path, "r", {"test/acc1": 0.5})
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table9")
    assert code == 2 and "unknown report part 'table9'" in out.err and "table1" in out.err
    code, out = run_report(capsys, tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "does not exist" in out.err


def test_broken_files_become_failed_runs(tmp_path, capsys):
    write_run(tmp_path, "ok", {"test/acc1": 0.5})
    write_run(tmp_path, "json", None)
    (tmp_path / "json" / "metrics.json").write_text("{not json")
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "config.yaml").write_text("task: [unclosed\n")
    runs = load_runs([tmp_path]).set_index("path")
    assert runs["status"].to_dict() == {
        str((tmp_path / n).resolve()): s for n, s in [("json", "failed"), ("ok", "ok"), ("yaml", "failed")]
    }
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out")
    assert code == 0 and "unreadable config.yaml" in out.out and "unreadable metrics.json" in out.out


def test_experiment_flag_replaces_default_filters(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path, f"s{seed}", {"test/acc1": 0.5 + 0.1 * seed}, data="cifar10",
                  fraction=0.1, experiment="sweep", seed=seed)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "a", "--only", "table1")
    assert "`table1`: skipped" in out.out  # not ImageNet-100 with all labels
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "b", "--only", "table1",
                        "--experiment", "sweep")
    _, cells = parse_table(section(out.out, "Table 1"))
    assert cells == {"mask_strong": {"Ours": "55.0 ± 7.1"}}
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "c", "--only", "table1",
                           "--experiment", "sweep", "--data", "stl10")
    # was: an empty report ("`table1`: skipped"); a filter that matches no run is now an error
    assert code == 2 and "unknown --data 'stl10'; accepted: cifar10" in out.err


def test_two_backbones_of_our_method_get_two_tables(tmp_path, capsys):
    for model, value in (("vit_s", 0.6), ("vit_b", 0.7)):
        write_run(tmp_path, model, {"test/acc1": value}, model=model)
    _, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1")
    _, cells = parse_table(section(out.out, "Table 1: in-domain accuracy (%) (vit_b)"))
    assert cells == {"mask_strong": {"Ours": "70.0"}}
    assert (tmp_path / "out" / "tables" / "table1_vit_s.tex").is_file()


@pytest.mark.parametrize("data", ["fashion_mnist", "cifar10"])
def test_tables_1_and_3_build_from_whatever_dataset_their_runs_used(tmp_path, capsys, data):
    """``make table3 ARGS="model=vit_tiny_test data=fashion_mnist ..."``'s runs: tables 1 and 3
    are built from them (not ImageNet-100 only), headed by their dataset."""
    for dist in ("mask_strong", "noise_strong", "blur_strong"):  # the table3 sweep, + baseline
        write_run(tmp_path, f"sup/{dist}", {"test/acc1": acc("supervised", dist, 0, data)},
                  method="supervised", distortion=dist, data=data, experiment="table3",
                  model="vit_tiny_patch16_224")
        for loss in ("global", "global_local", "global_attn", "multilevel"):
            write_run(tmp_path, f"t3/{dist}/{loss}", {"test/acc1": acc("ours", dist, 0, data, loss)},
                      distortion=dist, loss=loss, data=data, experiment="table3",
                      model="vit_tiny_patch16_224")
    code, out = run_report(capsys, tmp_path, "--out", tmp_path / "out", "--only", "table1,table3")
    assert code == 0 and "skipped" not in out.out
    _, cells = parse_table(section(out.out, "Table 1"))
    assert list(cells) == ["mask_strong", "noise_strong", "blur_strong"]
    assert cells["noise_strong"]["Supervised"] == f"{100 * acc('supervised', 'noise_strong', 0, data):.1f}"
    assert cells["blur_strong"]["Ours"] == f"{100 * acc('ours', 'blur_strong', 0, data):.1f}"  # multilevel
    header, cells = parse_table(section(out.out, "Table 3"))
    assert header == ["Loss", "Random Mask", "Gaussian Noise", "Gaussian Blur"]
    assert cells["Gl. Attention"]["Random Mask"] == f"{100 * acc('ours', 'mask_strong', 0, data, 'global_attn'):.1f}"
