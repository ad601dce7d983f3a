"""instruction-finetune: tune a model on instruction tasks, loss on outputs only.

YAML keys (``params``):

* ``tasks``: task sources — Natural Instructions task files, folders or globs of
  them, ``.jsonl`` instruction data (``fields``: instruction, input, output
  names), ``builtin:sentiment4`` (``?n=2000&seed=0&Mixed=0.05`` tunes it);
* ``k_examples`` and ``template``: the prompt (NI format: definition, k positive
  examples, input, "Output:"); stored with the model for ``evaluate``;
* ``max_per_task``: cap on training instances per task (multi-task mixing);
* ``max_len``: longest prompt + output in tokens (at most the model's context);
* ``trainer``, ``optim``, ``batch_size``, ``seed``: as in ``pretrain``.

Inputs: ``model``; optional ``data``, ``dataset`` artifacts with more instances.
Output: ``model``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, PathRef, hookimpl
from gptflow.ml.tasks import DEFAULT_TEMPLATE
from gptflow.params import OptimParams, Params, TrainerParams


class FinetuneParams(Params):
    tasks: list[Annotated[str, PathRef()]] = Field(default_factory=list)
    """Task sources: NI task .json files, folders, globs, .jsonl, builtin:sentiment4."""
    fields: tuple[str, str, str] = ("instruction", "input", "output")
    """Field names of instruction, input and output in .jsonl sources."""
    k_examples: int = Field(0, ge=0)
    """Positive examples (demonstrations) shown in each prompt."""
    template: str = DEFAULT_TEMPLATE
    """Prompt template with {definition}, {examples} and {input}."""
    max_per_task: int | None = Field(None, ge=1)
    """Cap on training instances per task, so that big tasks do not drown small ones."""
    max_len: int | None = Field(None, ge=8)
    """Longest prompt + output in tokens; default: the model's context."""
    trainer: TrainerParams = Field(default_factory=lambda: TrainerParams(max_steps=300))
    optim: OptimParams = Field(default_factory=lambda: OptimParams(lr=5e-4, min_lr=5e-5,
                                                                   warmup_steps=20))
    batch_size: int = Field(16, ge=1)
    seed: int = 1337


def run(context: Context, inputs: dict[str, Any], p: FinetuneParams) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.ml.instruct import Batches, InstructionBatches, encode_examples
    from gptflow.ml.lm import CausalLM
    from gptflow.ml.tasks import load_dataset_tasks, load_tasks
    from gptflow.ml.training import fit, loss_curve

    L.seed_everything(p.seed, verbose=False)
    model, tokenizer = load_model(inputs["model"].path)
    model.train()
    tasks = [t for source in p.tasks for t in load_tasks(source, p.fields)]
    tasks += [t for a in inputs.get("data") or [] for t in load_dataset_tasks(a.path)]
    if not tasks:
        raise NodeError("no tasks: give params.tasks or a data input")
    max_len = min(p.max_len or model.config.context, model.config.context)
    encode = dict(tokenizer=tokenizer, max_len=max_len, k_examples=p.k_examples,
                  template=p.template, seed=p.seed)
    train = encode_examples(tasks, split="train", max_per_task=p.max_per_task, **encode)
    val = encode_examples(tasks, split="val", **encode)
    if not val:
        raise NodeError("the tasks have no validation instances")
    context.log.info("%d training and %d validation examples from %d tasks", len(train),
                     len(val), len(tasks))
    module = CausalLM(model, p.optim, p.trainer.max_steps)
    batches = InstructionBatches(train, p.batch_size, tokenizer.pad_id, p.seed)
    trainer, tput, final = fit(context, module, batches,
                               DataLoader(Batches(val, p.batch_size, tokenizer.pad_id),
                                          batch_size=None), p.trainer, p.trainer.max_steps)
    out = context.output_dir("model")
    size = 0
    if trainer.is_global_zero:
        size = save_model(out, model, tokenizer,
                          prompt={"template": p.template, "k_examples": p.k_examples})
        loss_curve(context, out / "loss.png")
    return {"params": model.num_params(),
            "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
            "steps": trainer.global_step, "train_examples": len(train),
            "val_examples": len(val), "tasks": len(tasks), "tokens_per_s": tput.tokens_per_s,
            "bytes_on_disk": size,
            **{k: final[k] for k in ("train_loss", "val_loss", "val_ppl", "resumed_from_step")
               if k in final}}


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="instruction-finetune", run=run, params=FinetuneParams, version="1",
        inputs={"model": Input("model"),
                "data": Input("dataset", optional=True, many=True,
                              doc="dataset artifacts with more instruction instances")},
        outputs={"model": "model"},
        description="Instruction-tune a model (Natural Instructions format, prompt masked)."))
