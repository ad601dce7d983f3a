"""Full fine-tuning vs LoRA vs QLoRA, and the tuned model at int8 / int4:
pipelines/efficiency.yaml (a ~14M-parameter micro GPT) in its CPU form, every
node in its own worker process so that each node's memory is its own. Writes
the "Efficiency: tuning methods" section of RESULTS.md, in the shape of the
seed material's table (trainable share, memory, bytes, perplexity, accuracy).

    python benchmarks/tuning_methods.py [--store DIR] [--set PATH=VALUE ...]
"""

from __future__ import annotations

from results import report_rows, run_shipped, table, write_section

CPU_FORM = ["vars.steps=300", "vars.context=128", "vars.batch=16", "vars.tune_steps=300"]
MB = 1e6


def main() -> None:
    record, overrides = run_shipped("efficiency", CPU_FORM, jobs=2)
    nodes = record["nodes"]
    rows = report_rows(record)
    value = {(r["model"], r["metric"]): r["value"] for r in rows}

    def metric(model: str, name: str, fmt: str) -> str:
        found = value.get((model, name))
        return format(found, fmt) if found is not None else ""

    methods = []
    for name, label in (("full", "full fine-tuning"), ("lora", "LoRA"), ("qlora", "QLoRA")):
        m = nodes[name]["metrics"]
        methods.append([
            label, f"{m['trainable_params']:,}", f"{100 * m['trainable_share']:.2f}%",
            f"{m['train_state_bytes'] / MB:.1f}", f"{m['train_peak_rss_bytes'] / MB:.0f}",
            f"{m['bytes_on_disk'] / MB:.2f}", metric(name, "perplexity", ".2f"),
            metric(name, "accuracy", ".3f"), metric(name, "macro_f1", ".3f")])
    precisions = []
    for name, label in (("full", "fp32 (full FT)"), ("full-int8", "int8 + embeddings"),
                        ("full-int4", "int4 + embeddings")):
        precisions.append([label, metric(name, "bytes_on_disk", ",.0f"),
                           metric(name, "perplexity", ".2f"), metric(name, "accuracy", ".3f"),
                           metric(name, "gen_tokens_per_s", ".0f")])
    base = nodes["base"]["metrics"]
    body = table(["method", "trainable params", "share", "train state MB",
                  "peak RSS in training MB", "MB on disk", "perplexity", "accuracy", "macro-F1"],
                 methods) + "\n\n" + table(
        ["precision", "bytes on disk", "perplexity", "accuracy", "gen tokens/s"], precisions)
    write_section(
        "Efficiency: tuning methods", "python benchmarks/tuning_methods.py",
        f"pipelines/efficiency.yaml with {', '.join(overrides)} (run {record['run_id']}): a "
        f"{base['params'] / 1e6:.1f}M-parameter micro GPT pretrained on python-docs + reviews, "
        "then tuned on builtin:sentiment4 three ways (LoRA: rank 4 on every projection; "
        "QLoRA: the same on an NF4 base). Train state = weights as stored + gradient and "
        "two AdamW moments per trainable parameter. Peak RSS is the whole worker process "
        "during fit (torch and data included). Accuracy: sentiment4 test split by label "
        "likelihood; perplexity: the tokens' validation split. The base model's perplexity "
        f"is {value[('base', 'perplexity')]:.2f}.", body)


if __name__ == "__main__":
    main()
