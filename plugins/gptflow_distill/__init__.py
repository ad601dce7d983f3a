"""distill: train a small student on a frozen teacher's softened predictions.

loss = alpha · T² · KL(teacher || student) on temperature-T distributions
+ (1 - alpha) · cross-entropy with the true next tokens. The teacher runs in
eval mode without gradients; only the student learns. Student and teacher must
share a tokenizer.

Data: a ``tokens`` input (pretraining-style windows), or task data — ``tasks``
sources and/or ``data`` datasets, prompted as in instruction-finetune, with the
KL term at every real position (the prompt's too: the teacher's next-token
distribution is a signal wherever there is text) and cross-entropy on the
output tokens.

YAML keys (``params``): ``model`` (the student's config, when no ``student``
input is given), ``keep_layers`` (instead: the student is the teacher with that
many of its blocks, evenly spaced, as DistilBERT starts), ``alpha``,
``temperature``, ``trainer``, ``optim``, ``batch_size``, ``seed``, and for task
data the instruction-finetune keys (``tasks``, ``k_examples``, ``template``,
``max_per_task``, ``max_len``, ``loss_weight``: the hard term's).

Inputs: ``teacher`` (model), ``tokens`` or task data, optional ``student`` (a
model to start from). Output: ``model`` (the student).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, hookimpl
from gptflow.recipes.params import InstructionParams, ModelParams, OptimParams, TrainerParams


class DistillParams(InstructionParams):
    model: ModelParams = Field(default_factory=lambda: ModelParams(preset="tiny"))
    """The student to build (ignored when a student input is given)."""
    keep_layers: int | None = Field(None, ge=1)
    """Start the student as the teacher with this many of its blocks, evenly spaced
    (first and last kept), instead of building params.model."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the soft (teacher) term; 0 is plain training on the data."""
    temperature: float = Field(2.0, gt=0)
    """Softens both distributions; the soft term is scaled by its square."""
    trainer: TrainerParams = Field(default_factory=TrainerParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    batch_size: int = Field(32, ge=1)


def run(context: Context, inputs: dict[str, Any], p: DistillParams) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.ml.data import RandomWindows, SequentialWindows, TokenShards
    from gptflow.ml.distill import DistillLM, student_from_teacher
    from gptflow.ml.evaluation import generation_speed
    from gptflow.ml.model import GPT
    from gptflow.ml.optim import Optim
    from gptflow.ml.tokenizer import Tokenizer
    from gptflow.recipes.training import fit, loss_curve, seed
    from gptflow.recipes.tuning import tune

    seed(p.seed)
    teacher, teacher_tok = load_model(inputs["teacher"].path)
    tokens, data = inputs.get("tokens"), inputs.get("data") or []
    if (tokens is None) == (not p.tasks and not data):
        raise NodeError("give the student one kind of data: a tokens input, or task data "
                        "(params.tasks / a data input)")
    tokenizer = teacher_tok if tokens is None else Tokenizer.load(tokens.path / "tokenizer.json")
    if inputs.get("student") is not None and p.keep_layers is not None:
        raise NodeError("a student input and params.keep_layers both give the student; "
                        "give one")
    if inputs.get("student") is not None:
        student, student_tok = load_model(inputs["student"].path)
        student.train()
    elif p.keep_layers is not None:
        try:
            student, student_tok = student_from_teacher(teacher, p.keep_layers), teacher_tok
        except ValueError as e:
            raise NodeError(f"params.keep_layers: {e}") from None
        student.train()
    else:
        seed(p.seed)  # the student's initial weights depend on the seed alone
        student, student_tok = GPT(p.model.config(vocab_size=tokenizer.vocab_size)), tokenizer
    vocab = tokenizer.hf.get_vocab()
    for who, tok in (("teacher", teacher_tok), ("student", student_tok)):
        if tok.hf.get_vocab() != vocab:
            raise NodeError(f"the {who}'s tokenizer differs from the one the data is encoded "
                            "with: distillation needs one shared tokenizer")

    def module(model: GPT, optim: Optim, steps: int, reduction: str = "mean") -> DistillLM:
        return DistillLM(model, teacher, optim, steps, p.alpha, p.temperature, reduction)

    info: dict[str, Any] = {}
    if tokens is None:
        fitted = tune(context, student, tokenizer, p, data, module)
        info["prompt"] = p.prompt().to_dict()
    else:
        context_len = min(student.config.context, teacher.config.context)
        train = RandomWindows(TokenShards(tokens.path, "train"), context_len, p.batch_size,
                              p.seed)
        val = SequentialWindows(TokenShards(tokens.path, "val"), context_len)
        fitted = fit(context, module(student, p.optim.config(), p.trainer.max_steps), train,
                     DataLoader(val, batch_size=p.batch_size), p.trainer, p.trainer.max_steps)
    metrics = fitted.metrics
    metrics.update(teacher_params=teacher.num_params(),
                   param_ratio=student.num_params() / teacher.num_params())
    if fitted.trainer.is_global_zero:
        out = context.output_dir("model")
        metrics["bytes_on_disk"] = save_model(out, student, tokenizer, **info)
        loss_curve(context, out / "loss.png")
        student.eval()
        metrics["gen_tokens_per_s"] = generation_speed(student, tokenizer)
        metrics["teacher_gen_tokens_per_s"] = generation_speed(teacher, tokenizer)
    return metrics


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="distill", run=run, params=DistillParams, version="3",
        inputs={"teacher": Input("model"),
                "tokens": Input("tokens", optional=True, doc="pretraining-style data"),
                "data": Input("dataset", optional=True, many=True,
                              doc="task data (with or instead of params.tasks)"),
                "student": Input("model", optional=True, doc="a model to start the student from")},
        outputs={"model": "model"},
        headline=("val_loss", "param_ratio", "gen_tokens_per_s", "bytes_on_disk"),
        description="Knowledge distillation: a student learns from a frozen teacher."))
