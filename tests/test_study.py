"""`make study`: the paired statistics and verdicts of distortkd.report_study on generated run
folders, the best-recipe pick of distortkd.study, and (slow) the FAST study end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from distortkd import report, study, study_analysis

ROOT = Path(__file__).resolve().parent.parent
NOISE = {"name": "noise_strong", "family": "gaussian_noise", "params": {"sigma": 0.5}}
RANGE = {"name": "study_range_gaussian_noise", "family": "gaussian_noise", "params": {"sigma": [0.1, 0.5]}}
HELDOUT = ("shot_noise", "pixelate", "fog")


def _config(task, method, seed, dist, pre, fraction=0.1):
    return {"task": task, "experiment": "study", "method": method, "seed": seed,
            "model": {"name": "demo_vit", "weights_file": "teacher.ckpt"},
            "data": {"name": "fashion_mnist", "label_fraction": fraction, "train_subset": [0, 100],
                     "val_fraction": 0.05, "batch_size": 8},
            "trainer": {"max_steps": 200}, "distortion": dist, "loss": {"name": "multilevel"},
            "finetune": {"mode": "full", "test_ckpt": "best"}, "pretrain": {"distortion": pre}}


def _write(folder: Path, config: dict, metrics: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"status": "ok", **metrics, "config": config}))
    return folder


def _rows(acc: float, stage: str = "finetuned", cos: float = 0.5, teacher_cos: float = 0.5) -> list[dict]:
    """Evaluate rows: noise beyond (1.0) and at (0.5) training severity, mask (never seen), held-out."""
    cells = [("severity", "gaussian_noise", 0.5), ("severity", "gaussian_noise", 1.0), ("severity", "mask", 0.9)]
    cells += [("heldout", c, float(s)) for c in HELDOUT for s in (1, 2)]
    out = []
    for grid, name, sev in cells:
        row = {"grid": grid, "distortion": name, "severity": sev, "stage": stage, "cos_cls": cos,
               "teacher_cos_cls": teacher_cos, "cka_cls": cos, "teacher_cka_cls": teacher_cos}
        out.append(row if stage == "distilled" else {**row, "acc1": acc})
    return out


def make_study(root: Path, gap: float, cos_gap: float = 0.0, seeds=(0, 1, 2), spread=0.01) -> Path:
    """A study folder: baseline and fixed/range students on noise (10 % labels) with a student −
    baseline accuracy ``gap`` (+ a seed-dependent wobble ``spread``), their evaluations, curves
    and distilled students whose cosine to the clean teacher is ``cos_gap`` above the teacher's."""
    study_root = root / "study"
    for seed in seeds:
        wobble = spread * (seed - 1) ** 2
        for method, pre, acc in (("supervised", "noise_strong", 0.5), ("ours", "noise_strong", 0.5 + gap + wobble),
                                 ("ours", RANGE["name"], 0.5 + gap / 2 + wobble)):
            cfg = _config("finetune", method, seed, NOISE, pre)
            name = f"{method}_{pre}_s{seed}"
            run = _write(study_root / "finetune" / name, cfg, {"test/acc1": acc})
            (run / "csv").mkdir()
            steps = range(49, 200, 50)
            pd.DataFrame({"step": list(steps), "val/acc1": [acc - 0.01 * (i < 2) for i, _ in enumerate(steps)]}
                         ).to_csv(run / "csv" / "metrics.csv", index=False)
            ev = {**cfg, "task": "evaluate", "suite": "study", "evaluation": {"images": 10}}
            _write(study_root / "evaluate" / f"{name}_study", ev,
                   {"suite": "study", "rows": _rows(acc)})
        for pre in (NOISE, RANGE):
            cfg = {**_config("distill", "ours", seed, pre, pre["name"], 1.0), "task": "evaluate",
                   "suite": "study", "evaluation": {"images": 10}}
            _write(study_root / "evaluate" / f"distill_{pre['name']}_s{seed}_study", cfg,
                   {"suite": "study", "rows": _rows(0, "distilled", 0.5 + cos_gap + wobble, 0.5)})
    return study_root


def _report(study_root: Path, out: Path) -> str:
    assert report.main([str(study_root), "--layout", "study", "--out", str(out)]) == 0
    return (out / "results.md").read_text()


def _verdict_line(text: str, number: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{number}. "))


@pytest.mark.parametrize("gap, word", [(0.05, "better"), (-0.05, "worse"), (0.0, "no significant difference")])
def test_training_verdict_follows_sign_and_significance(tmp_path, gap, word):
    text = _report(make_study(tmp_path / "runs", gap, spread=0.01 if gap else 0.04), tmp_path / "out")
    line = _verdict_line(text, "1")
    assert f"2 of 2 {word}" in line, line
    for other in {"better", "worse", "no significant difference"} - {word}:
        assert other not in line


def test_paired_matches_scipy_and_pairs_on_seed():
    a = pd.Series([0.61, 0.58, 0.66, 0.70], index=[0, 1, 2, 3])
    b = pd.Series([0.50, 0.52, 0.55, 0.59], index=[3, 0, 1, 2])  # other order: pairing is by seed
    r = study_analysis.paired(a, b)
    x, y = a.sort_index().to_numpy(), b.sort_index().to_numpy()
    assert r.n == 4 and r.mean == pytest.approx((x - y).mean()) and r.std == pytest.approx((x - y).std(ddof=1))
    assert r.p == pytest.approx(stats.ttest_rel(x, y).pvalue)
    one = study_analysis.paired(a.iloc[:1], b)
    assert one.n == 1 and study_analysis.verdict(one, "up", "down").startswith("undetermined")


def test_detectable_effect_has_the_stated_power():
    rng = np.random.default_rng(0)
    for n in (3, 6):
        d = study_analysis.detectable_effect(n)
        diffs = rng.normal(d, 1.0, size=(20000, n))  # effect d in units of the differences' std
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / np.sqrt(n))
        power = (np.abs(t) > stats.t.ppf(1 - study_analysis.ALPHA / 2, n - 1)).mean()
        assert power == pytest.approx(0.8, abs=0.015)
    assert study_analysis.detectable_effect(3) > study_analysis.detectable_effect(6)


def test_mce_is_error_ratio_per_seed_and_ignores_other_label_fractions(tmp_path):
    study_root = make_study(tmp_path / "runs", 0.1, spread=0.0)
    # a 1 % baseline with another error must not enter the 10 % recipe's reference
    cfg = _config("finetune", "supervised", 0, NOISE, "noise_strong", 0.01)
    _write(study_root / "evaluate" / "sup_1pc_study", {**cfg, "task": "evaluate", "suite": "study",
                                                      "evaluation": {"images": 10}},
           {"suite": "study", "rows": _rows(0.1)})
    text = _report(study_root, tmp_path / "out")
    expected = (1 - 0.6) / (1 - 0.5) * 100  # student error 0.4 over baseline 0.5, every cell
    row = next(r for r in text.splitlines() if r.startswith("| fixed: noise_strong |"))
    assert row.split(" | ")[3] == f"{expected:.1f} ± 0.0"


def test_trained_max_reads_fixed_range_and_mixed():
    assert study_analysis.trained_max(NOISE) == {"gaussian_noise": 0.5}
    assert study_analysis.trained_max(RANGE) == {"gaussian_noise": 0.5}
    mixed = {"family": "mixed", "params": {"families": ["mask", "gaussian_blur"], "mask_ratio": [0.5, 0.9],
                                           "noise_sigma": [0.1, 0.5], "blur_sigma": [0.5, 1.5]}}
    assert study_analysis.trained_max(mixed) == {"mask": 0.9, "gaussian_blur": 1.5}


@pytest.mark.parametrize("cos_gap, word", [(0.1, "closer"), (-0.1, "farther")])
def test_recovery_verdict_compares_distilled_student_with_teacher(tmp_path, cos_gap, word):
    text = _report(make_study(tmp_path / "runs", 0.0, cos_gap), tmp_path / "out")
    line = _verdict_line(text, "4")
    assert line.count(f"2 of 2 {word}") == 2, line  # trained families and held-out corruptions
    assert (tmp_path / "out" / "recovery.png").stat().st_size > 0


def test_report_writes_figures_and_budget(tmp_path):
    text = _report(make_study(tmp_path / "runs", 0.05), tmp_path / "out")
    for name in ("severity.png", "mce.png", "recovery.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "## Fine-tune budget" in text and "Seeds [0, 1, 2]" in text


def test_report_without_study_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--layout", "study", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distortkd-report: error:")


def test_best_recipe_is_highest_heldout_accuracy(tmp_path, capsys):
    study_root = make_study(tmp_path / "runs", 0.05)  # fixed student +5 pts, range +2.5 pts
    assert study.main(["best", str(study_root)]) == 0
    assert capsys.readouterr().out.split() == ["noise_strong", "noise_strong"]
    study_root = make_study(tmp_path / "runs2", -0.05)  # now the range student is the better one
    assert study.main(["best", str(study_root)]) == 0
    assert capsys.readouterr().out.split() == ["noise_strong", RANGE["name"]]
    assert study.main(["best", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no study evaluation")


@pytest.mark.slow
def test_fast_study_end_to_end(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    env = {**os.environ, "FAST": "1", "SEEDS": "2", "DISTORTKD_RUNS": str(runs), "STUDY_OUT": str(out),
           "BIN": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "experiments/study/run.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "results.md").read_text()
    evaluated = sorted((runs / "study" / "evaluate").glob("*/metrics.json"))
    stages = {json.loads(p.read_text())["stage"] for p in evaluated}
    assert stages == {"finetuned", "distilled"}
    for p in evaluated:
        m = json.loads(p.read_text())
        assert m["status"] == "ok" and {r["grid"] for r in m["rows"]} == {"severity", "heldout"}
    # every recipe (fixed, range, leave one out, three ablations) has its verdict row
    for name in ("fixed: noise_strong |", "range: study_range_gaussian_noise", "leave one out: study_lofo_noise",
                 "[global]", "[global_local]", "[global_attn]"):
        assert name in text, name
    assert (out / "steps.png").stat().st_size > 0 and "Seeds [0, 1]" in text


def test_unfinished_runs_are_listed_not_used(tmp_path):
    study_root = make_study(tmp_path / "runs", 0.05)
    broken = study_root / "finetune" / "ours_noise_strong_s0"
    (broken / "metrics.json").write_text(json.dumps({"status": "failed", "error": "diverged"}))
    text = _report(study_root, tmp_path / "out")
    assert f"`{broken.resolve()}`: failed, diverged" in text
    row = next(r for r in text.splitlines() if r.startswith("| fixed: noise_strong |"))
    assert "(n = 2," in row.split(" | ")[1]  # the failed seed is not paired


def test_convergence_check_is_reported_apart_and_never_mixed_into_recipes(tmp_path):
    """Longer fine-tunes of the same recipe (the convergence check) get their own table; every
    recipe number stays that of the study's budget."""
    study_root = make_study(tmp_path / "runs", 0.05)
    before = _report(study_root, tmp_path / "before")
    wobble = (0.01, -0.01, 0.0)
    for seed in (0, 1, 2):  # 800 steps: the baseline gains 10 points, the student nothing
        for method, acc in (("supervised", 0.6 + 0.01 * seed), ("ours", 0.55 + 0.01 * (seed - 1) ** 2 + wobble[seed])):
            cfg = {**_config("finetune", method, seed, NOISE, "noise_strong"), "trainer": {"max_steps": 800}}
            run = _write(study_root / "finetune" / f"{method}_long_s{seed}", cfg, {"test/acc1": acc})
            # val over the long run: the baseline flat in its last quarter, the student still rising
            end = 0.6 + 0.01 * seed if method == "supervised" else 0.65 + 0.001 * seed
            (run / "csv").mkdir()
            pd.DataFrame({"step": [199, 399, 599, 799], "val/acc1": [0.5, 0.55, 0.6, end]}).to_csv(
                run / "csv" / "metrics.csv", index=False)
    text = _report(study_root, tmp_path / "after")
    recipe_row = lambda t: next(r for r in t.splitlines() if r.startswith("| fixed: noise_strong |"))  # noqa: E731
    assert recipe_row(text) == recipe_row(before)
    assert "## Fine-tune budget: 200 steps (every recipe) vs 800 steps (convergence check)" in text
    assert "Convergence check: 6 fine-tunes of 800 steps" in text
    rows = [r for r in text.splitlines() if r.startswith("| fixed: noise_strong | 0.1 |")]
    base = next(r for r in rows if "| baseline |" in r)
    student = next(r for r in rows if "| student |" in r)
    assert "| 50.0 ± 0.0 % | 61.0 ± 1.0 % |" in base and base.split(" | ")[-2].endswith(": gains"), base
    assert student.split(" | ")[-2].endswith(": no significant difference"), student
    assert "Long run: val, step 600 → 800" in text  # the long runs' last quarter, from their curves
    assert base.endswith(": no significant difference |") and student.endswith(": still rising |"), (base, student)
    gap = next(r for r in text.splitlines() if r.startswith("| fixed: noise_strong | 0.1 | +"))
    assert gap.split(" | ")[3].startswith("-"), gap  # the 5-point lead at 200 steps is gone at 800
    assert "## Fine-tune budget: student − baseline val accuracy early" in text


def test_recipe_order_is_the_same_under_every_hash_seed():
    """Loss ablations of one recipe tie on everything but the loss: their order must not depend on
    set iteration (PYTHONHASHSEED), or two report builds of the same runs differ."""
    code = ("import pandas as pd; from distortkd import study_analysis as s; "
            "rows = [('ours', 'study_mixed', 'study_mixed', l, 0.1) for l in "
            "('global_local', 'multilevel', 'global', 'global_attn')]; "
            "df = pd.DataFrame(rows, columns=['method', *s.RECIPE, 'data.label_fraction']); "
            "print([k[2] for k in s.recipes(df, 0.1)])")
    orders = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in range(6)}
    assert orders == {"['multilevel', 'global', 'global_attn', 'global_local']"}
