"""pretrain: train a GPT from scratch on token shards (causal LM, Lightning).

YAML keys (``params``):

* ``model``: ``preset`` plus any GPTConfig field (``position: rope|learned``,
  ``norm: rmsnorm|layernorm``, ``mlp: swiglu|gelu``, ``attention: sdpa|naive``,
  ``n_kv_head``, ``context``, ...);
* ``trainer``: lightning.Trainer settings (``max_steps``, ``precision``,
  ``devices``, ``strategy``, ``accumulate_grad_batches``, ...), and
  ``peak_tflops``, the peak MFU is reported against (measured when absent);
* ``optim``: AdamW (``lr``, ``min_lr``, ``warmup_steps``, ``beta2``, ``weight_decay``);
* ``batch_size``, ``seed``;
* ``tokens`` (``20x`` = 20 tokens per parameter, Chinchilla) or
  ``compute_budget_flops``: a budget that sets ``max_steps``;

Inputs: ``tokens``; optional ``init``, a model to continue training.
Output: ``model`` (config.json, model.safetensors, tokenizer.json, loss.png).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, hookimpl
from gptflow.recipes.params import Budget, ModelParams, OptimParams, TrainerParams


class PretrainParams(Budget):
    model: ModelParams = Field(default_factory=ModelParams)
    """The GPT to build (ignored when an init model is given)."""
    trainer: TrainerParams = Field(default_factory=TrainerParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    batch_size: int = Field(32, ge=1)
    """Sequences per micro-batch on each device."""
    seed: int = 1337
    """Seeds initialisation and the order of training windows."""


def run(context: Context, inputs: dict[str, Any], p: PretrainParams) -> dict[str, Any]:
    from torch.utils.data import DataLoader

    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.ml.data import RandomWindows, SequentialWindows, TokenShards
    from gptflow.ml.lm import CausalLM
    from gptflow.ml.model import GPT
    from gptflow.ml.tokenizer import Tokenizer
    from gptflow.recipes.training import fit, loss_curve, seed

    seed(p.seed)
    folder = inputs["tokens"].path
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    if inputs.get("init") is not None:
        model, init_tokenizer = load_model(inputs["init"].path)
        if init_tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
            raise NodeError("the init model's tokenizer differs from the one the tokens "
                            "were encoded with")
        model.train()
    else:
        model = GPT(p.model.config(vocab_size=tokenizer.vocab_size))
    cfg = model.config
    tp = p.trainer
    devices = tp.devices if isinstance(tp.devices, int) else 1
    tokens_per_step = p.batch_size * cfg.context * tp.accumulate_grad_batches * devices \
        * tp.num_nodes
    max_steps = p.steps(model.num_params(), tokens_per_step, tp.max_steps)
    train = RandomWindows(TokenShards(folder, "train"), cfg.context, p.batch_size, p.seed)
    val = SequentialWindows(TokenShards(folder, "val"), cfg.context)
    if not len(val):
        raise NodeError("the tokens artifact has no validation split (val_fraction: 0)")
    fitted = fit(context, CausalLM(model, p.optim.config(), max_steps), train,
                 DataLoader(val, batch_size=p.batch_size), tp, max_steps)
    if fitted.trainer.is_global_zero:
        out = context.output_dir("model")
        fitted.metrics["bytes_on_disk"] = save_model(out, model, tokenizer,
                                                     trained_tokens=fitted.metrics["tokens"])
        loss_curve(context, out / "loss.png")
    return fitted.metrics


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="pretrain", run=run, params=PretrainParams, version="1",
        inputs={"tokens": Input("tokens"),
                "init": Input("model", optional=True, doc="continue from this model")},
        outputs={"model": "model"},
        headline=("val_loss", "tokens_per_s", "mfu", "params"),
        description="Pretrain a GPT (causal LM) on token shards with Lightning."))
