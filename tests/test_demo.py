"""`make demo FAST=1`: every stage of the offline demo on real Fashion-MNIST, report checked
against the run folders it was built from."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_fast_demo_report_matches_run_folders(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "report"
    env = {**os.environ, "FAST": "1", "DISTORTKD_RUNS": str(runs), "DEMO_OUT": str(out), "CI": "1",
           "BIN": str(Path(sys.executable).parent)}
    proc = subprocess.run(["bash", str(ROOT / "experiments/demo/run.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.md", "severity.png", "labels.png", "attention.png", "steps.png"):
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

    # model selection on the val split carved from train; the steps table is the run's own log
    for method in ("supervised", "ours"):
        (run,) = (runs / "demo" / "finetune").glob(f"*_{method}_noise_strong_*_full_s0")
        cfg, m = (run / "config.yaml").read_text(), json.loads((run / "metrics.json").read_text())
        assert "val_fraction: 0.05" in cfg and "test_ckpt: best" in cfg
        log = [r for r in (run / "csv" / "metrics.csv").read_text().splitlines()[1:] if r]
        header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        vals = [(int(r.split(",")[header.index("step")]) + 1,
                 float(r.split(",")[header.index("val/acc1")])) for r in log
                if r.split(",")[header.index("val/acc1")]]
        best_step, best_val = max(vals, key=lambda sv: (sv[1], -sv[0]))
        label = {"supervised": "Supervised", "ours": "Ours"}[method]
        # the last four cells (before them, one "val @ N" column per step some run logged)
        row = re.search(rf"^\| noise_strong / 50% / {label} \|(?: [\d.]+ \|)* (\d+) \| (\d+) \| ([\d.]+) \| "
                        rf"([\d.]+) \|$", report, re.M)
        assert row, report
        assert f"| val @ {min(s for s, _ in vals)} |" in report  # the first check has its column
        assert int(row.group(1)) == max(s for s, _ in vals) and int(row.group(2)) == best_step
        assert float(row.group(3)) == pytest.approx(best_val * 100, abs=0.05)
        assert best_val == pytest.approx(m["best/val/acc1"])  # best.ckpt holds that check
        assert float(row.group(4)) == pytest.approx(m["test/acc1"] * 100, abs=0.05)


def knn_bank(augment: bool, torch_seed: int, rows: int = 200, keep: bool = False):
    """The k-NN feature bank of a tiny random ViT over ``rows`` Fashion-MNIST train images (and,
    with ``keep``, the module and datamodule that made it)."""
    import lightning as L

    from distortkd import distortions
    from distortkd.data import ImageDataModule
    from distortkd.modules import FinetuneModule
    from distortkd.vit import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_patch16_224", pretrained=False, in_chans=1, img_size=28,
                            patch_size=7, embed_dim=32, depth=2, num_heads=2)
    dm = ImageDataModule("fashion_mnist", image_size=28, in_chans=1, batch_size=64,
                         eval_batch_size=50, num_workers=0, pin_memory=False, limit_train=rows,
                         limit_eval=20, augment=augment, rrc_scale=(0.3, 1.0))
    module = FinetuneModule(encoder, 10, distortions.build("noise_strong"), optimizer=None,
                            mode="knn")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    torch.manual_seed(torch_seed)  # the bank must not depend on the global random state
    trainer.test(module, datamodule=dm, verbose=False)
    if keep:
        return module._bank, module, dm
    return module._bank, dm.dataset("train").index


@pytest.mark.parametrize("world", [2, 3])
def test_knn_bank_across_ranks_is_the_one_device_bank(world):
    """Under DDP each rank encodes its shard of the bank and the shards are gathered: the bank is
    the one-device bank row for row (203 rows: the last shard is padded, and the padding cut off).
    The ranks and ``all_gather`` are simulated: each rank's shards are recorded, then rank 0 gets
    them stacked as ``all_gather`` returns them."""
    from types import SimpleNamespace

    (one_feats, one_labels), module, dm = knn_bank(augment=False, torch_seed=0, rows=203, keep=True)
    shards: dict[int, list] = {}

    def bank_as(rank, gather):
        module._trainer = SimpleNamespace(world_size=world, global_rank=rank, datamodule=dm)
        module.all_gather = gather
        return module._feature_bank()

    for rank in range(world):
        shards[rank] = []
        bank_as(rank, lambda t, rank=rank: (shards[rank].append(t), torch.stack([t] * world))[1])
    assert sum(len(s[0]) for s in shards.values()) == -(-203 // world) * world  # padded to even shards
    gathered = iter(torch.stack([shards[r][i] for r in range(world)]) for i in range(2))
    feats, labels = bank_as(0, lambda t: next(gathered))
    assert torch.equal(feats, one_feats) and torch.equal(labels, one_labels)


def test_knn_bank_is_deterministic_and_independent_of_augment():
    (feats, labels), index = knn_bank(augment=True, torch_seed=1)
    (again, again_labels), _ = knn_bank(augment=True, torch_seed=2)
    (plain, plain_labels), _ = knn_bank(augment=False, torch_seed=3)
    assert feats.shape == (200, 32) and len(index) == 200
    assert torch.equal(feats, again) and torch.equal(labels, again_labels)
    assert torch.equal(feats, plain) and torch.equal(labels, plain_labels)
    from distortkd.sources import read_idx

    train_labels = read_idx(Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz"))
    assert labels.tolist() == train_labels[index.numpy()].tolist()  # every train row, in order


def test_paired_script_pairs_student_and_baseline_on_the_seed(tmp_path, capsys):
    """experiments/demo/paired.py: per-seed differences, their mean ± std and scipy's paired t-test,
    from finished runs only (a failed seed is left out of both methods' pairs)."""
    import runpy

    from scipy.stats import ttest_rel
    from test_report import write_run

    ours, sup = [0.61, 0.64, 0.62, 0.70], [0.60, 0.62, 0.615, 0.50]
    for seed in range(4):
        for method, accs in (("ours", ours), ("supervised", sup)):
            status = "failed" if (method, seed) == ("ours", 3) else "ok"
            write_run(tmp_path, f"{method}_s{seed}", {"status": status, "test/acc1": accs[seed]}, method=method,
                      seed=seed, fraction=0.1, extra={"finetune": {"mode": "full"}})
    write_run(tmp_path, "teacher", {"status": "ok", "test/acc1": 0.8}, method="supervised", distortion="noise_strong",
              extra={"finetune": {"mode": "full"}})
    runpy.run_path(str(Path(__file__).parents[1] / "experiments/demo/paired.py"), run_name="not_main")["main"](str(tmp_path))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mask_strong")]
    d = [100 * (o - s) for o, s in zip(ours[:3], sup[:3], strict=True)]
    p = ttest_rel([100 * o for o in ours[:3]], [100 * s for s in sup[:3]]).pvalue
    assert rows == [f"| mask_strong / 10% | {', '.join(f'{x:+.1f}' for x in d)} | "
                    f"{np.mean(d):+.1f} ± {np.std(d, ddof=1):.1f} | {p:.3f} |"]
