"""Fault injection for the reliability tests, loaded by the CLIs through ``+callbacks.<name>``."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILLs its own process as optimizer step ``step + 1`` starts, so ``last.ckpt`` (refreshed
    every step) holds step ``step`` exactly: a deterministic crash, where a kill from outside races."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
