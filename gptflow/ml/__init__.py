"""The ML library the node plugins share: model, tokenizers, data, Lightning
modules, LoRA, quantization, checkpoints, generation, Hugging Face I/O.

It takes plain dataclasses and knows nothing of nodes, params models or the
store (an import-linter contract keeps it so). Most of it imports torch; the
declarative modules (``config``, ``optim``, ``adapter``, ``prompts``, ``tasks``,
``corpora``) are pure Python, so params models can build on them.
"""
