"""pretrain: train a GPT from scratch on token shards (causal LM, Lightning).

YAML keys (``params``):

* ``model``: ``preset`` plus any GPTConfig field (``position: rope|learned``,
  ``norm: rmsnorm|layernorm``, ``mlp: swiglu|gelu``, ``attention: sdpa|naive``,
  ``n_kv_head``, ``context``, ...);
* ``trainer``: lightning.Trainer settings (``max_steps``, ``precision``,
  ``devices``, ``strategy``, ``accumulate_grad_batches``, ...);
* ``optim``: AdamW (``lr``, ``min_lr``, ``warmup_steps``, ``beta2``, ``weight_decay``);
* ``batch_size``, ``seed``;
* ``tokens`` (``20x`` = 20 tokens per parameter, Chinchilla) or
  ``compute_budget_flops``: a budget that sets ``max_steps``;
* ``peak_tflops``: the peak MFU is reported against (measured when absent).

Inputs: ``tokens``; optional ``init``, a model to continue training.
Output: ``model`` (config.json, model.safetensors, tokenizer.json, loss.png).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gptflow import Context, Input, NodeError, NodeType, hookimpl
from gptflow.params import Budget, ModelParams, OptimParams, TrainerParams


class PretrainParams(Budget):
    model: ModelParams = Field(default_factory=ModelParams)
    """The GPT to build (ignored when an init model is given)."""
    trainer: TrainerParams = Field(default_factory=TrainerParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    batch_size: int = Field(32, ge=1)
    """Sequences per micro-batch on each device."""
    seed: int = 1337
    """Seeds initialisation and the order of training windows."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak TFLOP/s for MFU; measured (CPU) or looked up (GPU) when absent."""


def run(context: Context, inputs: dict[str, Any], p: PretrainParams) -> dict[str, Any]:
    import lightning as L
    from torch.utils.data import DataLoader

    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.ml.data import RandomWindows, SequentialWindows, TokenShards
    from gptflow.ml.lm import CausalLM
    from gptflow.ml.model import GPT
    from gptflow.ml.tokenizer import Tokenizer
    from gptflow.ml.training import fit, loss_curve, peak_flops

    L.seed_everything(p.seed, verbose=False)
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
    n_params = model.num_params()
    max_steps = p.steps(n_params, tokens_per_step, tp.max_steps)
    train = RandomWindows(TokenShards(folder, "train"), cfg.context, p.batch_size, p.seed)
    val = SequentialWindows(TokenShards(folder, "val"), cfg.context)
    if not len(val):
        raise NodeError("the tokens artifact has no validation split (val_fraction: 0)")
    module = CausalLM(model, p.optim, max_steps)
    trainer, tput, final = fit(context, module, train, DataLoader(val, batch_size=p.batch_size),
                               tp, max_steps)
    peak, source = ((p.peak_tflops * 1e12, "stated in params") if p.peak_tflops
                    else peak_flops(tp.accelerator))
    tokens_seen = trainer.global_step * tokens_per_step
    flops_per_token = model.flops_per_token()
    out = context.output_dir("model")
    size = 0
    if trainer.is_global_zero:
        size = save_model(out, model, tokenizer, trained_tokens=tokens_seen)
        loss_curve(context, out / "loss.png")
    return {
        "params": n_params,
        "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "steps": trainer.global_step,
        "tokens": tokens_seen,
        "flops": 6 * n_params * tokens_seen,
        "chinchilla_tokens": 20 * n_params,
        "tokens_per_s": tput.tokens_per_s,
        "step_ms": 1000 * tokens_per_step / tput.tokens_per_s if tput.tokens_per_s else 0.0,
        "mfu": tput.tokens_per_s * flops_per_token / peak if peak else 0.0,
        "peak_flops": peak,
        "peak_source": source,
        "bytes_on_disk": size,
        **final,
    }


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="pretrain", run=run, params=PretrainParams, version="1",
        inputs={"tokens": Input("tokens"),
                "init": Input("model", optional=True, doc="continue from this model")},
        outputs={"model": "model"},
        description="Pretrain a GPT (causal LM) on token shards with Lightning."))
