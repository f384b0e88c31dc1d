"""Attention-map panels for a fixed set of validation images, every N epochs (PNG + W&B)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from distortkd.draws import sample_seeds


class AttentionPanels(L.Callback):
    """Draws input / teacher on clean / student on distorted / teacher on distorted.

    The same ``num_images`` validation images (the first of the validation split) and the same
    per-sample corruptions every time, so panels are comparable across epochs. Written to
    ``<run_dir>/attention/epoch_NNN.png`` and logged to W&B as ``val/attention`` when it is on.
    """

    def __init__(self, run_dir: Path, every_n_epochs: int = 5, num_images: int = 4):
        self.out, self.every, self.k = Path(run_dir) / "attention", every_n_epochs, num_images
        self._batch = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        student = getattr(module, "student", None)
        epoch = trainer.current_epoch + 1
        if (trainer.sanity_checking or not trainer.is_global_zero or student is None
                or not student.is_vit or self.every <= 0 or epoch % self.every):
            return
        teacher = module.teacher.encoder
        if not teacher.is_vit or teacher.grid != student.grid:  # the panels share one patch grid
            return
        from distortkd.evaluation import attention_maps
        from distortkd.figures import attention_figures

        if self._batch is None:  # the same k validation images every epoch
            dm = trainer.datamodule
            batch = next(dm.device_batches(dm.val_dataloader(), module.device))
            self._batch = {key: batch[key][: self.k] for key in ("image", "index")}
        images = self._batch["image"]
        seeds = sample_seeds(self._batch["index"], module.eval_seed)
        with torch.no_grad():
            maps = attention_maps(student, module.teacher, module.teacher.encoder, images,
                                  module.distortion, seeds)
        self.out.mkdir(parents=True, exist_ok=True)
        npz = self.out / f"epoch_{epoch:03d}.npz"
        np.savez_compressed(npz, **maps)
        png = attention_figures(npz, self.out, max_images=self.k)[0].rename(self.out / f"epoch_{epoch:03d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/attention", images=[str(png)], step=trainer.global_step)
