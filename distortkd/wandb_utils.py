"""W&B: the training logger and the report's run; online with an API key, offline (one-line notice)
without; one run id per run folder (and per report folder)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from omegaconf import DictConfig

from distortkd.errors import UserError
from distortkd.rundir import umask

# W&B refuses these in a project name (wandb.sdk.wandb_settings); checked before any work.
_BAD_PROJECT = re.compile(r"[/\\#?%:]")


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _offline_notice(where: str) -> None:
    print(f"wandb: no API key configured; logging offline to {where} "
          "(sync later with `wandb sync`)", file=sys.stderr)


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
        _offline_notice("the run folder")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.get("entity"), group=cfg.experiment,
        tags=[str(cfg.distortion.name), str(cfg.loss.name), str(cfg.get("method", ""))],
        name=run_dir.name, id=run_id(run_dir), resume="allow", offline=bool(offline),
        save_dir=str(run_dir), settings={"silent": True} if offline else None,
    )


def check_project(project: str) -> None:
    """Refuses a W&B project name that W&B itself would refuse after the report was built."""
    if not project or len(project) > 128 or _BAD_PROJECT.search(project):
        raise UserError(f"W&B project {project!r} is not a valid name; accepted: 1-128 characters "
                        "without / \\ # ? % :")


def push_report(project: str, out: Path, dirs: list[Path], tables: list, figures: list[Path],
                group: str | None = None) -> Path:
    """Logs the report to one W&B run named after ``out``: each table as a ``wandb.Table`` under
    ``tables/<name>``, each figure as a ``wandb.Image`` under ``figures/<file stem>``, and
    ``results.md`` as a file. Offline (one-line notice) without credentials.

    The run id is kept in ``out/wandb_id.txt``, so rebuilding the report adds to the same run.
    ``group``: the experiment, so the report sits beside its training runs on the dashboard.

    Returns:
        The folder W&B wrote the run to (``<WANDB_DIR or out>/wandb/<run folder>``).
    """
    import wandb

    offline = not _has_credentials()
    where = Path(os.environ.get("WANDB_DIR") or out)
    if offline:
        _offline_notice(str(where / "wandb"))
    try:
        run = wandb.init(project=project, name=out.resolve().name, id=run_id(out), resume="allow",
                         group=group, job_type="report", dir=str(where),
                         mode="offline" if offline else None, settings=wandb.Settings(silent=True),
                         config={"dirs": [str(d) for d in dirs], "out": str(out)})
    except wandb.errors.Error as err:  # unreachable server, refused key: the files are written already
        raise UserError(f"could not start a W&B run in project {project!r} ({err}); the report is in "
                        f"{out}; WANDB_MODE=offline logs it offline") from None
    try:
        run.log({**{f"tables/{t.name}": _wandb_table(wandb, t) for t in tables},
                 **{f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}})
        if (out / "results.md").is_file():  # files in run.dir are uploaded at finish (save() warns)
            shutil.copy(out / "results.md", run.dir)
    finally:
        run.finish()
    return Path(run.dir).parent


def _wandb_table(wandb, table):
    """A report table (display strings, row labels as index) as a ``wandb.Table``."""
    cells = table.cells.astype(str)
    return wandb.Table(columns=[table.row_header, *map(str, cells.columns)],
                       data=[[str(k), *row] for k, row in zip(cells.index, cells.to_numpy().tolist(),
                                                               strict=True)])
