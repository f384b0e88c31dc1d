"""Distilled student − supervised baseline, paired on the seed, for every demo fine-tune cell:
test accuracy per seed, mean ± std of the differences and the paired t-test (``study_analysis.paired``,
the study's own test). Run: ``.venv/bin/python experiments/demo/paired.py experiments/demo/seeds3/runs/demo``.
Only finished runs whose checkpoints are unchanged count (``runs.load_runs``: status ok)."""

import sys

from distortkd.runs import load_runs
from distortkd.study_analysis import paired


def main(root: str) -> None:
    runs = load_runs([root])
    tuned = runs[runs["task"].eq("finetune") & runs["status"].eq("ok") & runs["method"].isin(["ours", "supervised"])
                 & runs["finetune.mode"].eq("full")]
    print("| Distortion / labels | Δ per seed (points) | mean ± std | p (paired t) |")
    print("|---|---|---|---|")
    for (dist, fraction), cell in tuned.groupby(["distortion.name", "data.label_fraction"]):
        if set(cell["method"]) != {"ours", "supervised"}:
            continue  # the teacher (supervised, clean) has no student to pair with
        acc = {m: cell[cell["method"].eq(m)].set_index("seed")["test/acc1"] * 100 for m in ("ours", "supervised")}
        result = paired(acc["ours"], acc["supervised"])
        per_seed = acc["ours"].sub(acc["supervised"]).dropna().sort_index()
        print(f"| {dist} / {fraction:.0%} | {', '.join(f'{d:+.1f}' for d in per_seed)} | "
              f"{result.mean:+.1f} ± {result.std:.1f} | {result.p:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/demo/runs/demo")
