"""Encoding speed: gptflow's tokenizer vs Hugging Face ``tokenizers`` (reference).

Both encode the same ~1 KB documents (docstrings of the standard library and
generated reviews, packed to about 1,000 characters) with the same trained
byte-level BPE vocabulary, into one stream with an end-of-text token after each
document; the ids must be identical. Writes the "Tokenize" section of RESULTS.md.

    python benchmarks/tokenize_throughput.py
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
from results import table, write_section

from gptflow.ml.corpora import python_docs, reviews
from gptflow.ml.tokenizer import Tokenizer

TARGET_MB = 30


def documents() -> list[str]:
    texts = list(python_docs()) + list(reviews())
    docs, current = [], ""
    for text in itertools.cycle(texts):
        current += text + "\n"
        if len(current) >= 1000:
            docs.append(current)
            current = ""
            if len(docs) * 1000 >= TARGET_MB * 1e6:
                return docs
    return docs


def main() -> None:
    docs = documents()
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    rows = []
    for vocab in (4096, 32768):
        tokenizer = Tokenizer.train_bpe(docs[:5000], vocab)
        start = time.perf_counter()
        batches = tokenizer.hf.encode_batch(docs, add_special_tokens=False)
        reference = np.concatenate([np.append(np.asarray(e.ids), tokenizer.eot_id)
                                    for e in batches])
        ref_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = tokenizer.encode_documents(docs)
        ours_s = time.perf_counter() - start
        identical = bool(np.array_equal(reference, ours))
        rows.append((vocab, megabytes / ref_s, megabytes / ours_s, identical))
    write_section("Tokenize", "python benchmarks/tokenize_throughput.py",
                  f"{megabytes:.0f} MB of ~1 KB documents, {os.cpu_count()} threads for both; "
                  "target >= 10 MB/s.",
                  table(["vocab", "HF tokenizers encode_batch MB/s", "gptflow MB/s", "ratio",
                         "identical ids"],
                        [[str(v), f"{r:.1f}", f"{o:.1f}", f"{o / r:.2f}x",
                          "yes" if same else "NO"] for v, r, o, same in rows]))


if __name__ == "__main__":
    main()
