"""The demo's CPU settings, measured: train step (batch 128) and eval forward (500 images) of the
demo's tiny ViT (conf/model/demo_vit.yaml), for 1 and 2 torch threads, timm's fused attention (SDPA)
on and off, ``torch.compile`` on and off, bf16 autocast (1 thread), AdamW's for-loop or fused
implementation, and glibc's default malloc thresholds or run.sh's (GLIBC_TUNABLES).
Run: ``.venv/bin/python experiments/demo/bench_cpu.py``. Each variant runs in its own process (timm
reads its attention switch at import, glibc its tunables at start-up)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch, timm, yaml
from importlib.resources import files
threads, fused, compiled, bf16, fused_adamw = int(sys.argv[1]), *(a == "1" for a in sys.argv[2:6])
torch.set_num_threads(threads)
timm.layers.set_fused_attn(fused)
cfg = yaml.safe_load((files("distortkd") / "conf/model/demo_vit.yaml").read_text())
torch.manual_seed(0)
m = timm.create_model(cfg["name"], pretrained=False, num_classes=10, **cfg["timm_kwargs"])
net = torch.compile(m) if compiled else m
opt = torch.optim.AdamW(m.parameters(), 5e-4, fused=fused_adamw or None, foreach=False if not fused_adamw else None)
x, y, xe = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)), torch.rand(500, 1, 28, 28)
amp = lambda: torch.autocast("cpu", torch.bfloat16, enabled=bf16)
def step():
    with amp():
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    opt.zero_grad(); loss.backward(); opt.step()
def best(fn, n, reps=3):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n): fn()
        out.append((time.perf_counter() - t) / n * 1000)
    return min(out)
for _ in range(5): step()
train = best(step, 30, reps=5)
net.eval()
with torch.no_grad(), amp():
    net(xe)
    ev = best(lambda: net(xe), 5)
print(json.dumps({"train_ms": round(train, 1), "eval_ms": round(ev, 1)}))
"""


def _run_sh_tunables() -> str:
    """The GLIBC_TUNABLES default that experiments/demo/run.sh exports (one definition)."""
    text = (Path(__file__).parent / "run.sh").read_text()
    return re.search(r"GLIBC_TUNABLES:-([^}]+)}", text).group(1)


def main() -> None:
    print("| threads | fused attention (SDPA) | torch.compile | bf16 autocast | AdamW | malloc "
          "| train step, batch 128 (ms) | eval, 500 images (ms) | process (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    # (threads, fused attention, compile, bf16, fused AdamW, run.sh's malloc thresholds); the
    # first row is what the demo ran before, the second what it runs now
    variants = [(1, 1, 0, 0, 0, 0), (1, 1, 0, 0, 1, 1), (1, 1, 0, 0, 1, 0), (1, 1, 0, 0, 0, 1),
                (1, 1, 1, 0, 1, 1), (1, 0, 0, 0, 1, 1), (1, 0, 1, 0, 1, 1), (1, 1, 0, 1, 1, 1),
                (2, 1, 0, 0, 1, 1), (2, 0, 0, 0, 1, 1)]
    on = lambda v: "on" if v else "off"  # noqa: E731
    tunables = _run_sh_tunables()
    for threads, fused, compiled, bf16, adamw, malloc in variants:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if malloc:
            env["GLIBC_TUNABLES"] = tunables
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, *map(str, (threads, fused, compiled, bf16, adamw))],
                             capture_output=True, text=True, check=True, env=env).stdout.splitlines()[-1]
        r = json.loads(out)
        print(f"| {threads} | {on(fused)} | {on(compiled)} | {on(bf16)} | {'fused' if adamw else 'for-loop'} "
              f"| {'run.sh' if malloc else 'default'} | {r['train_ms']} | {r['eval_ms']} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
