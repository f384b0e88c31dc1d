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


class SignalAtStep(Callback):
    """Sends ``signum`` to its own process as optimizer step ``step + 1`` starts: what ``timeout``,
    ``kill`` or a scheduler does, at a deterministic point."""

    def __init__(self, step: int, signum: str = "SIGTERM"):
        self.step, self.signum = step, getattr(signal, signum)

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step and not getattr(self, "sent", False):
            self.sent = True
            os.kill(os.getpid(), self.signum)
