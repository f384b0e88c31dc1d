"""W&B logger: online with an API key, offline (one-line notice) without; one run id per run folder."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

from omegaconf import DictConfig

from distortkd.rundir import umask


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def run_id(run_dir: Path) -> str:
    """The W&B run id stored in the run folder, so a resumed run continues the same dashboard run.

    Every DDP rank builds the logger: the id file appears whole and once (a hard link of a finished
    temp file fails if another process got there first), so all ranks and later resumes agree.
    """
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".wandb_id.")
        os.fchmod(fd, 0o666 & ~umask())  # as open() would: teammates read shared run roots
        with os.fdopen(fd, "w") as f:
            f.write(uuid.uuid4().hex[:12])
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
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
