"""distortkd: distortion-robust ViT representations by asymmetric multi-level distillation."""

from pathlib import Path

__version__ = "0.1.0"
# The Hydra configs, inside the package so that an installed wheel carries them (pyproject.toml
# package-data); the CLIs, the benchmarks and the tests compose from here.
CONF = str(Path(__file__).resolve().parent / "conf")
