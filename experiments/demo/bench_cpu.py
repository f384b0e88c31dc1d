"""The demo's CPU settings, measured: train step (batch 128) and eval forward (500 images) of the
demo's tiny ViT (conf/model/demo_vit.yaml), for 1 and 2 torch threads, timm's fused attention (SDPA)
on and off, ``torch.compile`` on and off, and bf16 autocast (1 thread). Run: ``.venv/bin/python experiments/demo/bench_cpu.py``.
Each variant runs in its own process (timm reads its attention switch at import)."""

import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch, timm, yaml
from importlib.resources import files
threads, fused, compiled, bf16 = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[4] == "1"
torch.set_num_threads(threads)
timm.layers.set_fused_attn(fused)
cfg = yaml.safe_load((files("distortkd") / "conf/model/demo_vit.yaml").read_text())
torch.manual_seed(0)
m = timm.create_model(cfg["name"], pretrained=False, num_classes=10, **cfg["timm_kwargs"])
net = torch.compile(m) if compiled else m
opt = torch.optim.AdamW(m.parameters(), 5e-4)
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
train = best(step, 20)
net.eval()
with torch.no_grad(), amp():
    net(xe)
    ev = best(lambda: net(xe), 5)
print(json.dumps({"train_ms": round(train, 1), "eval_ms": round(ev, 1)}))
"""


def main() -> None:
    print("| threads | fused attention (SDPA) | torch.compile | bf16 autocast | train step, batch 128 (ms) "
          "| eval, 500 images (ms) | process (s) |")
    print("|---|---|---|---|---|---|---|")
    variants = [(1, 1, 0, 0), (1, 1, 1, 0), (1, 0, 0, 0), (1, 0, 1, 0), (1, 1, 0, 1), (2, 1, 0, 0), (2, 0, 0, 0)]
    on = lambda v: "on" if v else "off"  # noqa: E731
    for threads, fused, compiled, bf16 in variants:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, *map(str, (threads, fused, compiled, bf16))],
                             capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        r = json.loads(out)
        print(f"| {threads} | {on(fused)} | {on(compiled)} | {on(bf16)} | {r['train_ms']} | {r['eval_ms']} | "
              f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
