"""Driving a Lightning Trainer for a gptflow node: trainer params, resumable
checkpoints keyed by fingerprint, progress, throughput, the training report,
loss curves.

What a crash, a signal or a divergence may do to a training node, and what
holds instead: a resumed run continues the exact batch and random-number
sequence of an uninterrupted one (batch k and step k's dropout are pure
functions of the seed and k), so its model is bit-identical on CPU;
checkpoints are written atomically beside themselves, the one before kept, and
one that does not load is set aside with a warning; SIGINT and SIGTERM stop at
the end of a step with a checkpoint; a loss that stops being finite fails the
node at that step.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset

from gptflow import signals
from gptflow.errors import NodeError, one_line
from gptflow.memory import PeakMemory
from gptflow.ml.instruct import real_tokens
from gptflow.ml.model import GPT
from gptflow.nodes import Context
from gptflow.recipes.params import TrainerParams
from gptflow.recipes.report import peak_flops, training_report

# third-party noise in node logs, silenced by name: lightning's pytree shim on torch
# 2.13, and lightning's litlogger advertisement
NOISY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",)
NOISY_LOG_LINES = ("💡 Tip: For seamless cloud logging",)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISY_LOG_LINES)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Keep the named third-party noise out of the node's log while it trains."""
    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    noise = _DropNoise()
    lightning_log.addFilter(noise)
    try:
        with warnings.catch_warnings():
            for message in NOISY_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        lightning_log.removeFilter(noise)


def seed(value: int) -> None:
    """Seed Python, numpy and torch (every rank alike)."""
    L.seed_everything(value, verbose=False)


class Throughput(Callback):
    """Tokens/s over training steps only (validation and warm-up excluded), the
    tokens of every batch, and progress. Tokens are real ones: padding is
    computed but not counted, and its share of what was computed reported."""

    def __init__(self, context: Context, max_steps: int) -> None:
        self.context, self.max_steps = context, max_steps
        self.train_time, self.tokens, self._start, self._batch_tokens = 0.0, 0, 0.0, 0
        self._reported = 0.0  # when progress was last reported
        self.timed_batches, self.seen, self.computed, self._batch_computed = 0, 0, 0, 0
        self.logged: dict[str, float] = {}  # what the module logged, as of the checkpoint
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints, so a resumed run reports the whole run."""
        logged = {k: float(v) for k, v in self._trainer.callback_metrics.items()} \
            if self._trainer else {}
        return {"train_time": self.train_time, "tokens": self.tokens, "seen": self.seen,
                "computed": self.computed, "timed_batches": self.timed_batches,
                "logged": logged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.train_time, self.tokens = state["train_time"], state["tokens"]
        self.seen, self.timed_batches = state["seen"], state["timed_batches"]
        self.computed = state.get("computed", self.seen)  # checkpoints before it was kept
        self.logged = dict(state["logged"])

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             *args: Any) -> None:
        self._start = time.perf_counter()
        self._batch_tokens = real_tokens(batch[1]) * trainer.world_size
        self._batch_computed = int(batch[0].numel()) * trainer.world_size

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           *args: Any) -> None:
        self.seen += self._batch_tokens
        self.computed += self._batch_computed
        if trainer.global_step > 2 or self.max_steps <= 10:  # skip warm-up steps
            self.train_time += time.perf_counter() - self._start
            self.tokens += self._batch_tokens
            self.timed_batches += 1
        step, now = trainer.global_step, time.perf_counter()
        if trainer.is_global_zero and (step % 10 == 0 or step == self.max_steps
                                       or now - self._reported >= 5):  # slow steps too
            self._reported = now
            loss = outputs["loss"].item() if isinstance(outputs, dict) else float("nan")
            self.context.progress(step, self.max_steps, f"step {step} loss {loss:.3f} "
                                  f"{self.tokens_per_s:,.0f} tokens/s")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_time if self.train_time else 0.0

    @property
    def padding_share(self) -> float:
        return 1 - self.seen / self.computed if self.computed else 0.0

    @property
    def seconds_per_batch(self) -> float:
        return self.train_time / self.timed_batches if self.timed_batches else 0.0


class Finite(Callback):
    """Fails the node at the step where the training loss stops being finite."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss).all()):
            raise NodeError(f"training diverged at step {trainer.global_step}: loss is "
                            f"{loss.item()}; nothing is published (lower optim.lr, or set "
                            "trainer.gradient_clip_val)")


class ExactResume(Callback):
    """What Lightning's checkpoint lacks for an exact resume: the batch stream is
    positioned at the checkpoint's step before its iterator is built, and the
    random numbers of batch k (dropout) are seeded from (seed, rank, k), so
    neither a restart nor an intermediate validation shifts them."""

    def __init__(self, dataset: Any, start_step: int) -> None:
        self.dataset, self.start_step = dataset, start_step
        self._batch = 0

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._batch = self.start_step * trainer.accumulate_grad_batches
        self.dataset.start_batch, self.dataset.rank = self._batch, trainer.global_rank

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        seed = hash((self.dataset.seed, trainer.global_rank, self._batch)) % 2**63
        # not torch.manual_seed: its calls queued for uninitialised CUDA, XPU and MTIA
        # format a stack trace each, 2.6 ms of a 50 ms step
        torch.default_generator.manual_seed(seed)
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.manual_seed_all(seed)
        self._batch += 1


class StopOnSignal(Callback):
    """SIGINT or SIGTERM (see :mod:`gptflow.signals`): save a checkpoint at the
    end of the step, where a resumed run continues exactly, and stop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if signals.pending() is not None and trainer.world_size == 1:  # several: Lightning's
            trainer.save_checkpoint(self.path)
            signals.stop()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule,
                     exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised by Lightning at a step's end
            trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed into place (a kill or
    a full disk mid-write leaves the last one whole); the one before is kept as
    ``previous.ckpt``, to fall back on."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)


PREVIOUS = "previous.ckpt"


def place_weights(model: GPT, precision: str) -> None:
    """Each parameter in the dtype training wants it in: trainable ones in float32
    (the optimizer's master copy) but under bf16-true, where everything is bf16;
    frozen ones in bfloat16 under a bf16 precision (LoRA's base: half the memory,
    and matmuls that take bf16 kernels without a cast each step), else in float32.
    One parameter at a time, and in the dtype Lightning would cast to, so no second
    copy of the model exists."""
    frozen = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    trainable = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for param in model.parameters():
        param.data = param.data.to(trainable if param.requires_grad else frozen)
    # the model's own RoPE tables: float32, as at init (a quantized layer's scales keep
    # the dtype they are stored in)
    for name, buffer in model.named_buffers(recurse=False):
        if buffer.is_floating_point():
            setattr(model, name, buffer.float())


def resume_point(context: Context) -> tuple[Path | None, int]:
    """The newest checkpoint of this fingerprint that loads, and its step. One
    that does not (a full disk, a damaged file) is set aside, and the user told."""
    folder = context.work_dir / "checkpoints"
    for tmp in folder.glob(".*.tmp"):  # writes a kill interrupted
        tmp.unlink(missing_ok=True)
    unreadable = []
    for path in (folder / "last.ckpt", folder / PREVIOUS):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
            step = int(state["global_step"])
        except Exception as e:  # whatever a damaged file raises
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            unreadable.append(f"{path} does not load ({one_line(e)}); set aside as {aside.name}")
            continue
        found: tuple[Path | None, int] = path, step
        break
    else:
        found = None, 0
    if unreadable:
        outcome = f"resuming from {found[0].name} (step {found[1]})" if found[0] \
            else "starting from scratch"
        context.warn(f"checkpoint {'; '.join(unreadable)}: {outcome}")
    return found


def make_trainer(context: Context, tp: TrainerParams, max_steps: int,
                 callbacks: list[Callback]) -> L.Trainer:
    loggers: list[Logger] = [CSVLogger(str(context.work_dir), name="logs", version=0)]
    for name in tp.loggers:  # under the run's folder: they outlive the node's work folder
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(str(context.log_dir), name="tensorboard",
                                             version=""))
        else:
            from lightning.pytorch.loggers import WandbLogger

            loggers.append(WandbLogger(name=context.node, save_dir=str(context.log_dir)))
    checkpoints = ModelCheckpoint(dirpath=context.work_dir / "checkpoints", save_last=True,
                                  save_top_k=0, every_n_train_steps=tp.checkpoint_every)
    return L.Trainer(
        max_steps=max_steps, max_time=tp.max_time, precision=tp.precision,  # type: ignore[arg-type]
        accelerator=tp.accelerator, devices=tp.devices, strategy=tp.strategy,
        num_nodes=tp.num_nodes, accumulate_grad_batches=tp.accumulate_grad_batches,
        gradient_clip_val=tp.gradient_clip_val, log_every_n_steps=tp.log_every_n_steps,
        val_check_interval=tp.val_check_interval, check_val_every_n_epoch=None,
        limit_val_batches=tp.limit_val_batches if tp.val_check_interval else 0,
        num_sanity_val_steps=0, logger=loggers, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(context.work_dir),
        callbacks=[checkpoints, *callbacks, *context.training_callbacks()],
        plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


@dataclass
class Fitted:
    """What a training run leaves: the trainer (rank, global step) and its metrics
    (what the module logged, the full-split validation, the training report)."""

    trainer: L.Trainer
    metrics: dict[str, Any]


def fit(context: Context, module: L.LightningModule, train: IterableDataset[Any],
        val_loader: DataLoader[Any], tp: TrainerParams, max_steps: int) -> Fitted:
    """Train ``module.model`` (resuming from the last checkpoint of this fingerprint),
    then measure the validation loss over the whole split."""
    with quiet_third_party():
        return _fit(context, module, train, val_loader, tp, max_steps)


def _fit(context: Context, module: L.LightningModule, train: IterableDataset[Any],
         val_loader: DataLoader[Any], tp: TrainerParams, max_steps: int) -> Fitted:
    model = module.model
    assert isinstance(model, GPT), "a training module keeps its GPT as .model"
    place_weights(model, tp.precision)
    model.recompute_blocks = tp.activation_checkpointing
    checkpoint, start_step = resume_point(context)
    if checkpoint:
        context.log.info("resuming from %s (step %d)", checkpoint, start_step)
    throughput = Throughput(context, max_steps)
    trainer = make_trainer(context, tp, max_steps, [
        throughput, ExactResume(train, start_step), Finite(),
        StopOnSignal(context.work_dir / "checkpoints" / "last.ckpt")])
    cuda = torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda"
    if cuda:  # the allocator's stats exist once CUDA is initialised (fit would, later)
        torch.cuda.init()  # type: ignore[no-untyped-call]
        torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
    with PeakMemory() as peak, signals.deferred():
        try:
            trainer.fit(module, train_dataloaders=DataLoader(train, batch_size=None),
                        val_dataloaders=val_loader,
                        ckpt_path=str(checkpoint) if checkpoint else None)
        except SystemExit:  # Lightning's own SIGTERM stop (several processes)
            signals.stop()
            raise
    metrics: dict[str, Any] = {**throughput.logged,
                               **{k: float(v) for k, v in trainer.callback_metrics.items()}}
    memory = {"train_peak_rss_bytes": peak.bytes}  # the process: libraries and data included
    if cuda:
        memory["train_peak_cuda_bytes"] = torch.cuda.max_memory_allocated(
            trainer.strategy.root_device)
    trainer.limit_val_batches = 1.0  # the final validation covers the whole split
    (final,) = trainer.validate(module, dataloaders=val_loader, verbose=False)
    report = training_report(model, trainer.global_step, throughput.seen,
                             throughput.tokens_per_s, throughput.padding_share,
                             throughput.seconds_per_batch * tp.accumulate_grad_batches,
                             peak_flops(tp.accelerator, tp.peak_tflops), start_step, memory)
    return Fitted(trainer, {**metrics, **{k: float(v) for k, v in final.items()}, **report})


def loss_curve(context: Context, out: Path) -> None:
    """Plot train and validation loss from the CSV log into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = context.work_dir / "logs" / "version_0" / "metrics.csv"
    if not log.exists():
        return
    series: dict[str, tuple[list[int], list[float]]] = {"train_loss": ([], []),
                                                         "val_loss": ([], [])}
    with open(log) as f:
        for row in csv.DictReader(f):
            for key, (steps, values) in series.items():
                if row.get(key):
                    steps.append(int(row["step"]))
                    values.append(float(row[key]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, (steps, values) in series.items():
        if steps:
            ax.plot(steps, values, label=key, marker="o" if key == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{context.node}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
