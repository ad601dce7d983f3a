"""instruction-finetune: tune every weight of a model on instruction tasks,
with the loss on output tokens only.

YAML keys (``params``):

* ``tasks``: task sources — Natural Instructions task files, folders or globs of
  them, ``.jsonl`` instruction data (``fields``: instruction, input, output
  names), ``builtin:sentiment4`` (``?n=2000&seed=0&Mixed=0.05`` tunes it);
* ``k_examples`` and ``template``: the prompt (NI format: definition, k positive
  examples, input, "Output:"); stored with the model for ``evaluate``;
* ``max_per_task``: cap on training instances per task (multi-task mixing);
* ``max_len``: longest prompt + output in tokens (at most the model's context);
* ``loss_weight``: ``example`` (every example weighs the same, however long its
  answer; the default) or ``token`` (every answer token does: long answers dominate);
* ``trainer``, ``optim``, ``batch_size``, ``seed``: as in ``pretrain``.

Inputs: ``model``; optional ``data``, ``dataset`` artifacts with more instances.
Output: ``model``.
"""

from __future__ import annotations

from typing import Any

from gptflow import Context, NodeType, hookimpl
from gptflow.recipes.params import TUNING_INPUTS, InstructionParams


def run(context: Context, inputs: dict[str, Any], p: InstructionParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.recipes.training import loss_curve
    from gptflow.recipes.tuning import tune

    model, tokenizer = load_model(inputs["model"].path)
    model.train()
    fitted = tune(context, model, tokenizer, p, inputs.get("data") or [])
    if fitted.trainer.is_global_zero:
        out = context.output_dir("model")
        fitted.metrics["bytes_on_disk"] = save_model(out, model, tokenizer,
                                                     prompt=p.prompt().to_dict())
        loss_curve(context, out / "loss.png")
    return fitted.metrics


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="instruction-finetune", run=run, params=InstructionParams, version="2",
        inputs=TUNING_INPUTS,
        outputs={"model": "model"},
        headline=("val_loss", "tokens_per_s", "trainable_params", "bytes_on_disk"),
        description="Instruction-tune a model (Natural Instructions format, prompt masked)."))
