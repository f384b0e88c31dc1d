"""The model card (``README.md``) of an exported folder: what the model is and how it was made
(distortion, data, loss), how to load it with timm, and the measured results of its run and of
the fine-tunes started from it. Text only: ``distortkd.export`` writes the files.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from distortkd import rundir

KEY_METRICS = {
    "val/cos_clean": "cosine(student on distorted, teacher on clean), CLS, validation split",
    "val/cos_clean_baseline": "the same for the starting model (the teacher on distorted images)",
    "val/attn_kl": "KL between student and teacher CLS attention, last block",
    "best/val/loss": "lowest validation distillation loss",
    "val/acc1": "top-1 accuracy on distorted validation images",
    "test/acc1": "top-1 accuracy on distorted test images",
}


LOSS_TEXT = {
    "multilevel": "α·MSE(CLS) + β·MSE(patch tokens) + γ·KL(CLS→patch attention at temperature τ), "
                  "student on distorted vs frozen teacher on clean images",
    "contrastive": "Contrastive Inversion: InfoNCE from the student's embedding of the distorted image "
                   "to the frozen teacher's embedding of the clean one, temperature τ",
}


def _params(node: dict | None) -> str:
    return ", ".join(f"`{k}` = {v}" for k, v in (node or {}).items()) or "none"


def _what(config: dict, params: int) -> str:
    """The card's first paragraph: which model, made how."""
    info, (c, h, w) = config["distortkd"], config["input_size"]
    dist = (info["distortion"] or {}).get("name")
    made = {
        "distill": f"distilled to be robust to **{dist}**: a frozen copy of the starting model "
                   "(the teacher) sees clean images, this student the same crops distorted, and the "
                   "student learns to reproduce the teacher's features",
        "finetune": f"fine-tuned with labels on **{dist}**-distorted images "
                    f"({(info.get('finetune') or {}).get('mode')} mode; classification head not exported)",
    }.get(info["task"], f"from a `{info['task']}` run")
    return (f"A `{config['architecture']}` image encoder (timm, {params / 1e6:.2f} M parameters, "
            f"{config['num_features']}-d embedding, input {c}×{h}×{w}), {made}. Method: "
            f"`{info.get('method')}`; starting model: `{info['model']}` ({info['start_weights']}).")


def _usage(config: dict, overlay: dict) -> str:
    """The exact timm calls that rebuild the model (``overlay``: its ``pretrained_cfg_overlay``,
    ``file`` the weights in the export folder), as a Python code block."""
    folder = Path(overlay["file"]).parent
    lines = ",\n        ".join(f"{k}={v!r}" for k, v in overlay.items())
    args = "".join(f"    {k}={v!r},\n" for k, v in config["model_args"].items())
    return (
        "```python\nimport timm\nimport torch\n\n"
        f"model = timm.create_model(\n    {config['architecture']!r},\n    pretrained=True,\n"
        f"    pretrained_cfg_overlay=dict(\n        {lines},\n    ),\n{args}).eval()\n"
        f"# or, where timm supports local folders: timm.create_model('local-dir:{folder}', pretrained=True)\n"
        "data_cfg = timm.data.resolve_model_data_config(model)  # mean/std/input size above\n"
        "x = torch.rand(1, *data_cfg['input_size'])  # an image in [0, 1], then normalised:\n"
        "mean, std = (torch.tensor(data_cfg[k]).view(-1, 1, 1) for k in ('mean', 'std'))\n"
        "embedding = model((x - mean) / std)  # [1, num_features]: the CLS token\n```\n"
    )


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _results(metrics: dict, finetunes: list[dict]) -> str:
    """Metrics of the run (``metrics.json``) and of fine-tunes started from this student."""
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("train/")}
    if not numeric:
        return "No `metrics.json` was found for this run.\n"
    rows = [f"| `{k}` | {_fmt(numeric[k])} | {KEY_METRICS[k]} |" for k in KEY_METRICS if k in numeric]
    rows += [f"| `{k}` | {_fmt(v)} | |" for k, v in sorted(numeric.items()) if k not in KEY_METRICS]
    text = "From the run's `metrics.json` (last epoch unless prefixed `best/`):\n\n"
    text += "| metric | value | what it measures |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    if finetunes:
        text += ("\nFine-tuned from this student (top-1 on distorted test images):\n\n"
                 "| run | distortion | mode | label fraction | test/acc1 |\n|---|---|---|---|---|\n")
        text += "".join(f"| `{f['run']}` | {f['distortion']} | {f['mode']} | {f['label_fraction']} | "
                        f"{_fmt(f['test/acc1'])} |\n" for f in finetunes)
    return text


def init_run(cfg: DictConfig) -> Path | None:
    """The distill run folder a fine-tune config starts from (None: pretrained weights)."""
    init = cfg.get("init")
    if init in (None, "pretrained"):
        return None
    return Path(cfg.pretrain.run_dir) if init == "auto" else Path(str(init)).parent.parent


def finetunes_of(run_cfg: DictConfig, run_dir: Path) -> list[dict]:
    """Finished fine-tune runs (``<experiment>/finetune/*``) that started from the distill run in
    ``run_dir`` (config ``run_cfg``)."""
    if run_cfg.get("task") != "distill" or not (run_dir.parent.parent / "finetune").is_dir():
        return []
    rows, here = [], run_dir.resolve()
    for cfg_file in sorted((run_dir.parent.parent / "finetune").glob("*/config.yaml")):
        config, _ = rundir.read_config(cfg_file.parent)
        metrics, _ = rundir.read_metrics(cfg_file.parent)
        if config is None or metrics is None or metrics.get("status") != "ok":
            continue  # unreadable or unfinished: nothing to report on the card
        cfg = OmegaConf.create(config)
        start = init_run(cfg)
        if start is None or start.resolve() != here or "test/acc1" not in metrics:
            continue
        rows.append({"run": cfg_file.parent.name, "distortion": cfg.distortion.name,
                     "mode": cfg.finetune.mode, "label_fraction": cfg.data.get("label_fraction"),
                     "test/acc1": metrics["test/acc1"]})
    return rows


def _loss(info: dict) -> str:
    """The distillation loss; for a fine-tune, cross-entropy and, if any, its student's loss."""
    loss = info["loss"] or {}
    text = (f"`{loss.get('name')}` ({LOSS_TEXT.get(loss.get('fn'), loss.get('fn'))}); "
            f"parameters {_params(loss.get('params'))}.")
    if info["task"] != "finetune":
        return text
    if info["start_weights"].startswith("distilled student"):
        return f"Cross-entropy on labels, starting from a student distilled with {text}"
    return "Cross-entropy on labels (no distillation: the supervised baseline)."


def model_card(config: dict, overlay: dict, params: int, run_dir: Path, metrics: dict,
               finetunes: list[dict]) -> str:
    """A Hugging Face model card (``README.md``) for an exported folder: ``config`` its
    ``config.json``, ``overlay`` the timm overlay that loads it, ``params`` the backbone's
    parameter count, ``run_dir``/``metrics`` the source run, ``finetunes`` ``finetunes_of`` it."""
    info = config["distortkd"]
    dist = info["distortion"] or {}
    tags = ["timm", "image-feature-extraction", "knowledge-distillation", "robustness",
            f"distortion-{dist.get('family')}", str(info["data"])]
    front = ("---\nlibrary_name: timm\npipeline_tag: image-feature-extraction\ntags:\n"
             + "".join(f"- {t}\n" for t in tags) + "---\n\n")
    (c, h, w), crop = config["input_size"], config["crop_pct"]
    return (
        f"{front}# {run_dir.name}\n\n{_what(config, params)}\n\n"
        f"## Distortion\n\n`{dist.get('name')}`: family `{dist.get('family')}`, parameters "
        f"{_params(dist.get('params'))}, applied to images in [0, 1].\n\n"
        f"## Data\n\n`{info['data']}`, images at {h}×{w} px, {c} channel(s). Preprocessing: resize the "
        f"shorter side to {math.floor(h / crop)} px ({config['interpolation']}), center-crop {h}×{w}, scale to "
        f"[0, 1], normalise with mean {config['mean']} and std {config['std']}.\n\n"
        f"## Loss\n\n{_loss(info)}\n\n"
        f"## How to load\n\n{_usage(config, overlay)}\n"
        f"## Results\n\n{_results(metrics, finetunes)}\n"
        f"## Source\n\nCheckpoint `{info['source_checkpoint']}`; run config `{info['run_dir']}/config.yaml`. "
        "Exported with `distortkd-export`.\n"
    )
