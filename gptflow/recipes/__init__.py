"""Recipes: the glue between a node's params and the ML library.

``params`` holds the pydantic models training nodes share; ``sources`` turns
params values (paths, globs, ``builtin:`` names) into data; ``training`` drives
a Lightning Trainer for a node and returns one training report; ``tuning`` is
instruction tuning as full fine-tuning, LoRA and task distillation share it.
Plugins call these; :mod:`gptflow.ml` knows nothing of them.
"""
