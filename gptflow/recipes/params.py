"""Params models shared by training nodes (pydantic; importing them imports no torch).

Field docstrings are the help text of ``gptflow plugins NAME`` and the JSON
Schema; cross-field checks name the YAML key in their message.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from gptflow.ml.config import (
    MLP,
    PRESETS,
    Attention,
    GPTConfig,
    LayerType,
    Norm,
    Position,
    preset_config,
)
from gptflow.ml.optim import Optim
from gptflow.ml.prompts import DEFAULT_TEMPLATE, PromptFormat
from gptflow.nodes import Input, ObserveOnly, Params, PathRef


class ModelParams(Params):
    """The GPT to build: a preset, with any field overridden."""

    preset: str | None = "nano"
    """Named size and recipe: tiny, nano, shakespeare-char, micro, gpt2-small, llama-160m."""
    context: int | None = Field(None, ge=1)
    """Longest sequence the model attends over."""
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_kv_head: int | None = Field(None, ge=1)
    """Key/value heads for grouped-query attention (divides n_head)."""
    d_model: int | None = Field(None, ge=1)
    d_ff: int | None = Field(None, ge=1)
    position: Position | None = None
    """learned absolute positions (GPT-2) or rotary embeddings (RoPE)."""
    norm: Norm | None = None
    mlp: MLP | None = None
    attention: Attention | None = None
    """sdpa = torch's fused scaled_dot_product_attention (FlashAttention kernels on GPU)."""
    rope_theta: float | None = None
    rope_scaling: dict[str, Any] | None = None
    """RoPE frequency scaling as Hugging Face writes it: {rope_type: linear, factor: F}
    or {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings}."""
    norm_eps: float | None = None
    bias: bool | None = None
    qkv_bias: bool | None = None
    """Biases on the q, k and v projections only (Qwen2)."""
    qk_norm: bool | None = None
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    head_size: int | None = Field(None, ge=2)
    """Per-head width; default d_model / n_head."""
    norm_offset: float | None = None
    """RMSNorm scales by (norm_offset + w): 1 for Gemma, whose norm weights sit around 0."""
    embed_scale: bool | None = None
    """Token embeddings times sqrt(d_model) (Gemma)."""
    post_norms: bool | None = None
    """An RMSNorm on the attention and MLP outputs before the residual add (Gemma 3)."""
    query_pre_attn_scalar: float | None = Field(None, gt=0)
    """Attention scores scaled by its -1/2 power; default the head size (Gemma 3 sets it)."""
    sliding_window: int | None = Field(None, ge=1)
    """Sliding-window attention: a query sees at most this many latest keys (Mistral)."""
    layer_types: tuple[LayerType, ...] | None = None
    """Per layer, sliding_attention or full_attention; default every layer sliding when
    sliding_window is set (Gemma 3: five sliding, then one full)."""
    rope_local_theta: float | None = Field(None, gt=0)
    """RoPE base of the sliding layers; default rope_theta (Gemma 3: 10k, full layers 1M)."""
    dropout: float | None = Field(None, ge=0, lt=1)
    tie_embeddings: bool | None = None
    """Reuse the token embedding as the output head: softmax(W^T h)."""
    init_std: float | None = Field(None, gt=0)
    """Standard deviation of the initial weights (residual projections: / sqrt(2 n_layer))."""

    @model_validator(mode="after")
    def _builds(self) -> ModelParams:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        self.config(vocab_size=256)  # raises ValueError naming the inconsistent fields
        return self

    def config(self, vocab_size: int) -> GPTConfig:
        overrides = self.model_dump(exclude={"preset"}, exclude_none=True)
        return preset_config(self.preset, **overrides, vocab_size=vocab_size)


class OptimParams(Params):
    """AdamW with linear warmup and cosine decay; weight decay on matrices only."""

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate, reached after warmup_steps."""
    min_lr: float = Field(1e-4, ge=0)
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = Field(100, ge=0)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = Field(0.1, ge=0)
    """Applied to weight matrices and embeddings only, never to norms or biases."""

    @model_validator(mode="after")
    def _decays(self) -> OptimParams:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}: the schedule "
                             "decays from lr to min_lr (set min_lr too)")
        return self

    def config(self) -> Optim:
        return Optim(**self.model_dump())


class TrainerParams(Params):
    """Maps onto lightning.Trainer: scaling out is Lightning's job."""

    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to train (replaced by a token or FLOP budget when given)."""
    max_time: str | None = None
    """Stop after this wall time, DD:HH:MM:SS (e.g. 00:00:30:00)."""
    precision: str = "32-true"
    """32-true, bf16-mixed, 16-mixed, bf16-true, ..."""
    accelerator: str = "auto"
    """cpu, gpu, cuda, mps, auto."""
    devices: int | str = 1
    strategy: str = "auto"
    """auto, ddp, fsdp, deepspeed, ..."""
    num_nodes: int = Field(1, ge=1)
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = 1.0
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping
    them: about a third more compute for a fraction of the activation memory (long
    sequences, big batches, models that barely fit)."""
    # observe-only: what is watched, not what is computed (never in the fingerprint)
    val_check_interval: Annotated[int | None, ObserveOnly()] = None
    """Steps between validations (a sample of limit_val_batches); None: only at the end."""
    limit_val_batches: Annotated[int, ObserveOnly()] = Field(50, ge=1)
    """Batches per intermediate validation; the final one covers the whole split."""
    log_every_n_steps: Annotated[int, ObserveOnly()] = Field(10, ge=1)
    checkpoint_every: Annotated[int, ObserveOnly()] = Field(200, ge=1)
    """Steps between resumable checkpoints (kept in the node's work folder)."""
    loggers: Annotated[list[Literal["tensorboard", "wandb"]], ObserveOnly()] = Field(
        default_factory=list)
    """Extra Lightning loggers, written under the run's folder (runs/<id>/loggers/<node>);
    CSV metrics are always kept. For MLflow, turn on tracking (tracking: {mlflow: ...})."""
    peak_tflops: Annotated[float | None, ObserveOnly()] = Field(None, gt=0)
    """Peak TFLOP/s that MFU is reported against; measured (CPU) or looked up (GPU)
    when absent."""

    @field_validator("loggers", mode="before")
    @classmethod
    def _mlflow_is_tracking(cls, v: Any) -> Any:
        if isinstance(v, list) and "mlflow" in v:
            raise ValueError("mlflow is not a trainer logger: turn on tracking for the "
                             "pipeline (tracking: {mlflow: {}} or gptflow run --track mlflow)")
        return v

    @field_validator("max_time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d{2}:\d{2}:\d{2}:\d{2}", v):
            raise ValueError("max_time is DD:HH:MM:SS, e.g. 00:00:30:00")
        return v

    @model_validator(mode="after")
    def _fsdp_needs_gpu(self) -> TrainerParams:
        if self.strategy.startswith("fsdp") and self.accelerator == "cpu":
            raise ValueError("strategy: fsdp requires a GPU accelerator (use ddp on CPU)")
        return self


class Budget(Params):
    """How long to train, as Chinchilla would say it."""

    tokens: str | int | None = None
    """Training tokens: a number, or a multiple of the parameter count like '20x'
    (Chinchilla-optimal is about 20 tokens per parameter). Sets max_steps."""
    compute_budget_flops: float | None = None
    """Training FLOPs (6·N·D); sets max_steps."""

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and not re.fullmatch(r"\d+(\.\d+)?x", v):
            raise ValueError("tokens is a number or a multiple of the parameter count like '20x'")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> Budget:
        if self.tokens is not None and self.compute_budget_flops is not None:
            raise ValueError("give tokens or compute_budget_flops, not both")
        return self

    def steps(self, params: int, tokens_per_step: int, default: int) -> int:
        """max_steps implied by the budget (``default`` when there is none)."""
        if self.tokens is not None:
            total = (float(self.tokens[:-1]) * params if isinstance(self.tokens, str)
                     else self.tokens)
        elif self.compute_budget_flops is not None:
            total = self.compute_budget_flops / (6 * params)
        else:
            return default
        return max(1, round(total / tokens_per_step))


TEMPLATE_FIELDS = ("definition", "examples", "input")


class InstructionParams(Params):
    """Instruction tuning on tasks: what full fine-tuning and LoRA share."""

    tasks: list[Annotated[str, PathRef("tasks")]] = Field(default_factory=list)
    """Task sources: NI task .json files, folders, globs, .jsonl, builtin:sentiment4."""
    chats: list[Annotated[str, PathRef()]] = Field(default_factory=list)
    """Chat data: .jsonl files with messages: [{role, content}, ...] per line; the
    loss is on the assistant's turns only, the prompt is the model's chat template."""
    fields: tuple[str, str, str] = ("instruction", "input", "output")
    """Field names of instruction, input and output in .jsonl sources."""
    k_examples: int = Field(0, ge=0)
    """Positive examples (demonstrations) shown in each prompt."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template with {definition}, {examples} and {input}."""
    format: Literal["ni", "chat"] = "ni"
    """ni: the prompt as plain text; chat: sent as a user message through the model's
    chat template (instruct models), the answer as the assistant's turn."""
    max_per_task: int | None = Field(None, ge=1)
    """Cap on training instances per task, so that big tasks do not drown small ones."""
    max_len: int | None = Field(None, ge=8)
    """Longest prompt + output in tokens; default: the model's context."""
    oversample: bool = False
    """Repeat the training instances of each classification task's smaller classes
    (drawn at random) until every class is as large as its largest."""
    loss_weight: Literal["example", "token"] = "example"
    """example: every training example weighs the same in the loss, its answer's tokens
    sharing its weight, so a one-word label counts as much as a 56-token translation;
    token: every answer token weighs the same (Hugging Face's Trainer), and tasks with
    long answers drown those with short ones."""
    reverse: bool = False
    """Train the tasks backwards — write an input given its output (a review given
    its label): the generator that generate-synthetic-data samples from."""

    @field_validator("template")
    @classmethod
    def _plain_fields(cls, v: str) -> str:
        """Only {definition}, {examples} and {input}, as they are: a format spec such
        as {input:>10000000000} would build a 10 GB string for every prompt."""
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(v)
                      if name is not None]
        except ValueError as e:
            raise ValueError(f"not a template: {e}") from None
        for name, spec, conversion in fields:
            if name not in TEMPLATE_FIELDS:
                raise ValueError(f"unknown field {{{name}}}: a template has "
                                 f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")
            if spec or conversion:
                raise ValueError(f"{{{name}}} takes no format spec or conversion here")
        return v

    def prompt(self) -> PromptFormat:
        """How the tuned model is prompted: stored with it for evaluate and synth."""
        return PromptFormat(self.template, self.k_examples, self.reverse, self.format == "chat")
    trainer: TrainerParams = Field(default_factory=lambda: TrainerParams(max_steps=300))
    optim: OptimParams = Field(default_factory=lambda: OptimParams(lr=5e-4, min_lr=5e-5,
                                                                   warmup_steps=20))
    batch_size: int = Field(16, ge=1)
    seed: int = 1337


TUNING_INPUTS = {"model": Input("model"),
                 "data": Input("dataset", optional=True, many=True,
                               doc="dataset artifacts with more instruction instances")}
"""The input slots of every instruction-tuning node."""
