"""A plugin that kills its own process with SIGKILL at a chosen training step,
through the public callback hook: ``KILL_NODE=base KILL_AT_STEP=7``."""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch.callbacks import Callback

from gptflow import hookimpl


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def register_training_callbacks(node: str, run_id: str, tracking: Any, log_dir: str,
                                register: Any) -> None:
    if node == os.environ.get("KILL_NODE"):
        register(KillAt(int(os.environ["KILL_AT_STEP"])))
