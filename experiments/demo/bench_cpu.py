"""The demo's CPU settings, measured: train step (batch 128) and eval forward (500 images) of the
demo's tiny ViT (conf/model/demo_vit.yaml), for 1 and 2 torch threads, timm's fused attention (SDPA)
on and off, and ``torch.compile`` on and off. Run: ``.venv/bin/python experiments/demo/bench_cpu.py``.
Each variant runs in its own process (timm reads its attention switch at import)."""

import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch, timm, yaml
from importlib.resources import files
threads, fused, compiled = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
torch.set_num_threads(threads)
timm.layers.set_fused_attn(fused)
cfg = yaml.safe_load((files("distortkd") / "conf/model/demo_vit.yaml").read_text())
torch.manual_seed(0)
m = timm.create_model(cfg["name"], pretrained=False, num_classes=10, **cfg["timm_kwargs"])
net = torch.compile(m) if compiled else m
opt = torch.optim.AdamW(m.parameters(), 5e-4)
x, y, xe = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,)), torch.rand(500, 1, 28, 28)
def step():
    loss = torch.nn.functional.cross_entropy(net(x), y); opt.zero_grad(); loss.backward(); opt.step()
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
with torch.no_grad():
    net(xe)
    ev = best(lambda: net(xe), 5)
print(json.dumps({"threads": threads, "fused_attn": fused, "compile": compiled, "train_ms": round(train, 1), "eval_ms": round(ev, 1)}))
"""


def main() -> None:
    print("| threads | fused attention (SDPA) | torch.compile | train step, batch 128 (ms) | eval, 500 images (ms) |")
    print("|---|---|---|---|---|")
    for threads in (1, 2):
        for fused in (1, 0):
            for compiled in (0, 1):
                if compiled and threads == 2:
                    continue
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(fused), str(compiled)],
                                     capture_output=True, text=True, check=True).stdout.splitlines()[-1]
                r = json.loads(out)
                print(f"| {threads} | {'on' if fused else 'off'} | {'on' if compiled else 'off'} | "
                      f"{r['train_ms']} | {r['eval_ms']} |  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
