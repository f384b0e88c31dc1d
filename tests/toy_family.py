"""A toy distortion family for the registry tests: one class and one YAML file, nothing else.

Not registered on import: ``test_family_registry`` registers it for one test at a time (and puts
the registries back), and ``pytest -p toy_family`` registers it for a whole session
(``pytest_configure``), to show that the registry-parametrised tests pick it up unchanged.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from distortkd.distortions import Distortion, Family, register_distortion
from distortkd.draws import Draw

# The one YAML file of the family, as a user would put it in their own config folder.
PRESET_YAML = "name: quant_strong\nfamily: quantize\nparams:\n  step: 0.25\n"


@dataclass(frozen=True)
class Quantize(Distortion):
    """Rounds pixel values to multiples of ``step`` (pixel-value units): posterisation."""

    step: float = 0.1
    family = "quantize"
    record = Family("Quantize", "QZ", prefix="quant", param="step", bounds=(0.01, 1.0),
                    grid=(0.05, 0.1, 0.2, 0.4), strong="quant_strong",
                    presets={"quant_weak": {"step": 0.1}, "quant_strong": {"step": 0.25}})

    def apply(self, images: Tensor, draw: Draw) -> Tensor:
        return self.per_sample(images, torch.full((images.shape[0],), float(self.step)), draw, (0, 1))

    @classmethod
    def per_sample(cls, images: Tensor, severity: Tensor, draw: Draw, bounds: tuple[float, float]) -> Tensor:
        step = severity.to(images).view(-1, 1, 1, 1)
        return (torch.round(images / step) * step).clamp(0, 1)

    @property
    def severity(self) -> float:
        return self.step


def write_config(folder: Path) -> Path:
    """``folder/distortion/quant_strong.yaml``: a config folder to add with Hydra's searchpath."""
    (folder / "distortion").mkdir(parents=True, exist_ok=True)
    (folder / "distortion" / "quant_strong.yaml").write_text(PRESET_YAML)
    return folder


def pytest_configure(config):
    register_distortion(Quantize)
