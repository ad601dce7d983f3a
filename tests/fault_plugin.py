"""A plugin that sends a signal to its own process at a chosen moment of a
training node, through the public callback hook.

``GPTFLOW_FAULT=NODE:MOMENT:STEP:SIGNAL``: MOMENT is ``batch`` (the end of
training step STEP, before that step's checkpoint is written) or ``train_end``
(after the last checkpoint, before the final validation and the publish).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback

from gptflow import hookimpl


class Fault(Callback):
    def __init__(self, moment: str, step: int, signum: int) -> None:
        self.moment, self.step, self.signum = moment, step, signum

    def _maybe(self, trainer: Any, moment: str) -> None:
        if moment == self.moment and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self._maybe(trainer, "batch")

    def on_train_end(self, trainer: Any, *args: Any) -> None:
        self._maybe(trainer, "train_end")


@hookimpl
def register_training_callbacks(node: str, run_id: str, tracking: Any, log_dir: str,
                                register: Any) -> None:
    fault = os.environ.get("GPTFLOW_FAULT", "")
    if fault.startswith(f"{node}:"):
        _, moment, step, name = fault.split(":")
        register(Fault(moment, int(step), signal.Signals[f"SIG{name}"]))
