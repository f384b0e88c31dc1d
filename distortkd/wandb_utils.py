"""W&B logger: online with an API key, offline (one-line notice) without; one run id per run folder."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def run_id(run_dir: Path) -> str:
    """The W&B run id stored in the run folder, so a resumed run continues the same dashboard run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def make_wandb_logger(cfg: DictConfig, run_dir: Path):
    from lightning.pytorch.loggers import WandbLogger

    offline = cfg.logger.get("offline") or not _has_credentials()
    if offline and not cfg.logger.get("offline"):
        print("wandb: no API key configured; logging offline to the run folder "
              "(sync later with `wandb sync`)", file=sys.stderr)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.experiment,
        tags=[str(cfg.distortion.name), str(cfg.loss.name), str(cfg.get("method", ""))],
        name=run_dir.name, id=run_id(run_dir), resume="allow", offline=bool(offline),
        save_dir=str(run_dir), settings={"silent": True} if offline else None,
    )
