"""load-model: a model from outside the store, as a ``model`` artifact any node takes.

YAML keys (``params``):

* ``path``: a Hugging Face Hub id, ``hf:ORG/NAME@REVISION`` (only the files a
  model needs, into huggingface_hub's cache; fingerprinted by the commit the
  revision resolves to; offline from the cache with ``HF_HUB_OFFLINE=1``), a local
  Hugging Face folder (``config.json`` with a ``model_type``,
  safetensors or ``pytorch_model.bin``, ``tokenizer.json`` or ``vocab.json`` +
  ``merges.txt``) of the GPT-2 or Llama family, a GGUF file (llama.cpp / ollama;
  Llama architecture, any quantization the ``gguf`` package de-quantizes: the
  ``gguf`` extra), or a gptflow model folder. Its files' content is part of the
  fingerprint: editing them re-runs the node. The tokenizer keeps its special
  tokens, BOS/EOS and chat template;
* ``format``: how nodes that prompt the model as it is (evaluate, synthetic
  data, ``gptflow generate``) render a task for it: ``ni`` (plain text, the
  default) or ``chat`` (a user message through its chat template, for instruct
  models). Tuning nodes store their own.

The weights keep their stored dtype on disk (bf16 stays bf16); nodes compute in
float32. No inputs. Output: ``model``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from gptflow import Context, NodeError, NodeType, Params, PathRef, hookimpl


class LoadParams(Params):
    path: Annotated[str, PathRef("hub")]
    """A Hugging Face model folder, a Hub id (hf:ORG/NAME@REVISION; fingerprinted by
    the commit it resolves to, offline from the cache with HF_HUB_OFFLINE=1), a GGUF
    file, or a gptflow model folder."""
    format: Literal["ni", "chat"] = "ni"
    """How a task is prompted for this model as it is: plain text, or through its
    chat template."""


def run(context: Context, inputs: dict[str, Any], p: LoadParams) -> dict[str, Any]:
    from gptflow.ml.checkpoint import load_model, save_model
    from gptflow.ml.families import family_of
    from gptflow.ml.gguf_io import is_gguf, load_gguf
    from gptflow.ml.hf import is_hf_folder, load_hf
    from gptflow.ml.prompts import PromptFormat
    from gptflow.recipes.sources import model_path

    try:
        source = model_path(p.path)
        if is_gguf(source):
            model, tokenizer = load_gguf(source)
            family, source_format = family_of(model.config).name, "gguf"
        elif is_hf_folder(source):
            model, tokenizer = load_hf(source)
            family, source_format = family_of(model.config).name, "hf"
        else:
            model, tokenizer = load_model(source)
            family = source_format = "gptflow"
    except (ValueError, OSError) as e:  # HFError, GGUFError, ModelLoadError, unreadable files
        raise NodeError(f"params.path: {e}") from None
    if p.format == "chat" and not tokenizer.config.chat_template:
        raise NodeError(f"params.format: chat needs a chat template, and {p.path} has none")
    size = save_model(context.output_dir("model"), model, tokenizer, source_format=source_format,
                      family=family, prompt=PromptFormat(chat=p.format == "chat").to_dict())
    return {"family": family, "source_format": source_format, "params": model.num_params(),
            "bytes_on_disk": size}


@hookimpl
def register_node_types(register: Any) -> None:
    register(NodeType(
        name="load-model", run=run, params=LoadParams, version="1",
        outputs={"model": "model"},
        headline=("family", "params", "bytes_on_disk"),
        description="Bring a Hugging Face (GPT-2/Llama) folder, a GGUF file or a gptflow model "
                    "into the store."))
