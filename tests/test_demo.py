"""`make demo FAST=1`: every stage of the offline demo on real Fashion-MNIST, report checked
against the run folders it was built from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fast_demo_report_matches_run_folders(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    env = {**os.environ, "FAST": "1", "DISTORTKD_RUNS": str(runs), "DEMO_OUT": str(out), "CI": "1",
           "BIN": str(Path(sys.executable).parent)}
    proc = subprocess.run(["bash", str(ROOT / "experiments/demo/run.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.md", "severity.png", "labels.png", "attention.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "results.md").read_text()

    # every fine-tuned accuracy in the demo table is the one in its run's metrics.json
    finetuned = {}
    for metrics in (runs / "demo" / "finetune").glob("*/metrics.json"):
        cfg = (metrics.parent / "config.yaml").read_text()
        if "mode: knn" in cfg or "name: clean" in cfg:
            continue
        method = re.search(r"^method: (\w+)", cfg, re.M).group(1)
        finetuned[method] = json.loads(metrics.read_text())["test/acc1"] * 100
    assert set(finetuned) == {"supervised", "ours"}
    row = re.search(r"^\| noise_strong / 50% \| ([\d.]+) \| ([\d.]+) \| ([+-][\d.]+) \|", report, re.M)
    assert row, report
    assert float(row.group(1)) == pytest.approx(finetuned["supervised"], abs=0.05)
    assert float(row.group(2)) == pytest.approx(finetuned["ours"], abs=0.05)

    # the before/after cosine of the distillation runs
    distill = runs / "demo" / "distill"
    (noise_run,) = [p for p in distill.iterdir() if "noise_strong" in p.name]
    m = json.loads((noise_run / "metrics.json").read_text())
    row = re.search(r"^\| noise_strong \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    assert float(row.group(1)) == pytest.approx(m["val/cos_clean_baseline"], abs=5e-4)
    assert float(row.group(2)) == pytest.approx(m["val/cos_clean"], abs=5e-4)
    assert "k-NN accuracy" in report and "mixed_demo" in report
