"""Instruction data, prompt masking, label scoring, metrics, the report."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import NI_TASKS, TINY_BASE, real_data

from gptflow.ml.config import preset_config
from gptflow.ml.evaluation import (
    baselines,
    classification_metrics,
    classify,
    generation_metrics,
    label_log_likelihoods,
    paired_gains,
    perplexity,
    resampled_scores,
)
from gptflow.ml.instruct import (
    IGNORE,
    Example,
    InstructionBatches,
    collate,
    encode_examples,
    real_tokens,
)
from gptflow.ml.model import GPT
from gptflow.ml.prompts import PromptFormat
from gptflow.ml.tasks import Instance, load_task_files, oversampled, sentiment4
from gptflow.ml.tokenizer import Tokenizer

EXPECTED = {  # from the data README: instances kept, labels of classification tasks
    "task823_peixian-rtgender_sentiment_analysis": (161, ["Mixed", "Negative", "Neutral",
                                                          "Positive"]),
    "task875_emotion_classification": (170, ["anger", "fear", "joy", "love", "sadness",
                                             "surprise"]),
    "task379_agnews_topic_classification": (104, ["Business", "Sci/Tech", "Sports", "World"]),
    "task288_gigaword_summarization": (111, None),
    "task530_europarl_en_es_translation": (92, None),
    "task582_naturalquestion_answer_generation": (123, None),
}


def test_loader_on_every_real_task_file():
    tasks = {t.name: t for t in load_task_files(real_data(*NI_TASKS))}
    assert set(tasks) == set(EXPECTED)
    for name, (count, labels) in EXPECTED.items():
        task = tasks[name]
        assert len(task.instances) == count
        assert task.labels == labels
        assert task.definition and task.examples
        splits = [task.split(s) for s in ("train", "val", "test")]
        assert sum(map(len, splits)) == count
        ids = [{i.id for i in s} for s in splits]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert len(splits[2]) > 0.1 * count
        held_out = ids[1] | ids[2]  # val and test
        assert [i.id for i in task.split("held-out")] == [i.id for i in task.instances
                                                          if i.id in held_out]
    assert tasks["task530_europarl_en_es_translation"].kind == "translation"
    assert tasks["task582_naturalquestion_answer_generation"].kind == "generation"
    multi = [i for i in tasks["task582_naturalquestion_answer_generation"].instances
             if len(i.outputs) > 1]
    assert len(multi) == 16  # as the README says


def test_sentiment4_imbalance_knob_keeps_test_balanced():
    task = sentiment4(n=2000, Mixed="0.05")
    train = [i.outputs[0] for i in task.split("train")]
    test = [i.outputs[0] for i in task.split("test")]
    assert 0.035 < train.count("Mixed") / len(train) < 0.065
    assert all(abs(test.count(label) - 100) < 35 for label in task.labels)
    mixed = next(i for i in task.instances if i.outputs[0] == "Mixed")
    assert any(w in mixed.input for w in ("but", "however", "yet", "Although"))


def test_prompt_format_matches_natural_instructions():
    task = sentiment4(n=10, test=4)
    prompt = PromptFormat().render(task, "I thought the animation was good, but the movie "
                                 "disappointed me.", k_examples=1)
    assert prompt.startswith("Definition: Classify the given review")
    assert "Positive Example 1 -\nInput: " in prompt
    assert prompt.endswith("Now complete the following example -\nInput: I thought the "
                           "animation was good, but the movie disappointed me.\nOutput:")


def test_prompt_is_masked_out_of_the_loss():
    examples = [Example(np.array([5, 6, 7, 8]), np.array([20, 21, 0])),
                Example(np.array([9, 10]), np.array([30, 0]))]
    x, y = collate(examples, pad_id=1)
    assert x.tolist() == [[5, 6, 7, 8, 20, 21], [9, 10, 30, 1, 1, 1]]
    assert y.tolist() == [[IGNORE, IGNORE, IGNORE, 20, 21, 0],
                          [IGNORE, 30, 0, IGNORE, IGNORE, IGNORE]]


def test_encoded_examples_end_with_the_answer():
    task = sentiment4(n=40, test=8)
    tok = Tokenizer.train_bpe([i.input for i in task.instances] + ["Output: Positive"], 400, 1)
    examples = encode_examples([task], tok, "train", max_len=48)
    for e, inst in zip(examples, task.split("train"), strict=True):
        assert tok.decode(e.target) == " " + inst.outputs[0]
        assert e.target[-1] == tok.eot_id and len(e.prompt) + len(e.target) <= 48
        assert tok.decode(e.prompt).endswith("Output:")


def test_label_scoring_equals_the_full_forward_of_prompt_and_label():
    """Labels continue the prompt's KV cache together: the same log-likelihoods as
    running prompt + label whole, for labels of different lengths."""
    tok = Tokenizer.train_char(["abc xyz pq"])
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size, context=32)).eval()
    prompts, labels = ["pq abc", "x", "abcabcabc"], ["ab", "xyz", "y"]
    scores = label_log_likelihoods(model, tok, prompts, labels)
    for n, prompt in enumerate(prompts):
        for k, label in enumerate(labels):
            ids = tok.encode(prompt + " " + label)
            n_label = len(tok.encode(" " + label))
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)
            expected = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_label,
                                                                     len(ids)))
            assert scores[n, k] == pytest.approx(expected, abs=1e-4)
    assert (classify(model, tok, prompts, labels) ==
            [labels[j] for j in scores.argmax(axis=1)])


def test_classification_metrics_by_hand():
    labels = ["a", "b", "c"]
    metrics, confusion = classification_metrics(["a", "a", "b", "c", "zzz"],
                                                ["a", "b", "b", "c", "c"], labels)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    # "zzz" is no label: counted as a wrong one ("a" for gold "c"), so
    # a: P 1/3 R 1 -> F1 1/2; b: P 1 R 1/2 -> 2/3; c: P 1 R 1/2 -> 2/3
    assert metrics["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    assert metrics["f1_a"] == pytest.approx(1 / 2)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    base = baselines(["a", "a", "b"], ["a", "b", "c", "a"], labels)
    assert base["majority"]["accuracy"] == pytest.approx(0.5)


def test_resampled_scores_are_the_torchmetrics_figures_of_each_resample():
    rng = np.random.default_rng(0)
    golds, preds = rng.integers(0, 5, 40), rng.integers(0, 4, 40)
    golds[golds == 3] = 0  # class 3 only predicted, class 4 only true, class 5 nowhere
    labels = [str(c) for c in range(6)]
    draws = np.stack([np.arange(40), rng.integers(0, 40, 40)])
    accuracy, macro_f1 = resampled_scores(preds, golds, 6, draws)
    for row, draw in enumerate(draws):
        metrics, _ = classification_metrics([labels[c] for c in preds[draw]],
                                            [labels[c] for c in golds[draw]], labels)
        assert accuracy[row] == pytest.approx(metrics["accuracy"])
        assert macro_f1[row] == pytest.approx(metrics["macro_f1"])
    assert 0.05 < metrics["accuracy_ci95"] < 0.3 and 0.02 < metrics["macro_f1_ci95"] < 0.3


def test_paired_gains_are_the_difference_with_a_paired_interval():
    rng = np.random.default_rng(0)
    golds = rng.integers(0, 3, 30)
    reference = np.where(rng.random(30) < 0.5, golds, (golds + 1) % 3)
    better = np.where(rng.random(30) < 0.5, golds, reference)  # right wherever it was, and more
    labels = ["a", "b", "c"]
    gains = paired_gains(better, reference, golds, 3)
    scores = [classification_metrics([labels[c] for c in x], [labels[c] for c in golds],
                                     labels)[0] for x in (better, reference)]
    for metric in ("accuracy", "macro_f1"):
        assert gains[f"{metric}_gain"] == pytest.approx(scores[0][metric] - scores[1][metric])
        assert 0 < gains[f"{metric}_gain_low"] < gains[f"{metric}_gain"]
        # pairing: the gain's interval is narrower than an unpaired difference's
        half_width = (gains[f"{metric}_gain_high"] - gains[f"{metric}_gain_low"]) / 2
        assert half_width < math.hypot(scores[0][f"{metric}_ci95"], scores[1][f"{metric}_ci95"])
    same = paired_gains(reference, reference, golds, 3)
    assert same["accuracy_gain_low"] == same["accuracy_gain_high"] == 0


def test_generation_metrics_by_hand():
    metrics = generation_metrics(["The Cat sat", "a dog"],
                                 [["the cat sat."], ["no", "a big dog"]], translation=True)
    assert metrics["exact_match"] == pytest.approx(0.5)  # normalised: case and punctuation
    # ROUGE-L F of "a dog" vs "a big dog": LCS 2, P 2/2, R 2/3 -> 0.8; best over references
    assert metrics["rouge_l"] == pytest.approx((1.0 + 0.8) / 2, abs=1e-4)
    assert 0 <= metrics["bleu"] <= 1 and 0 <= metrics["chrf"] <= 1


def test_finetune_and_evaluate_end_to_end(run_pipeline, review_corpus):
    result = run_pipeline("name: ft\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  sft:
    plugin: instruction-finetune
    inputs: {model: base.model}
    params:
      tasks: ["builtin:sentiment4?n=200&test=40&Mixed=0.05"]
      oversample: true
      trainer: {max_steps: 10}
      batch_size: 8
  heldout:                # held-out text in the tuned model's own tokens
    plugin: tokenize
    inputs: {model: sft}
    params: {corpus: ["REVIEWS"], val_fraction: 0.5}
  eval:
    plugin: evaluate
    inputs: {models: [base, sft], tokens: heldout.tokens}
    params: {tasks: ["builtin:sentiment4?n=200&test=40"], max_instances: 100, context: 16,
             compare_to: base, split: held-out}
""".replace("REVIEWS", str(review_corpus)))
    assert result.code == 0, result.out + result.err
    sft = result.record["nodes"]["sft"]["metrics"]
    assert sft["train_examples"] > 200 * 0.7  # the 5% Mixed class repeated
    report = json.loads((result.output("eval") / "report.json").read_text())
    assert report["split"] == "held-out"
    counts = {r["value"] for r in report["rows"] if r["metric"] == "instances"}
    assert counts == {20 + 40}  # the 10% of 200 in val and the 40 of test
    models = {r["model"] for r in report["rows"]}
    assert models == {"base", "sft", "majority", "random"}
    metrics = {(r["model"], r["metric"]) for r in report["rows"]}
    assert {("sft", "accuracy"), ("sft", "macro_f1"), ("base", "perplexity"),
            ("sft", "f1_Mixed"), ("random", "macro_f1")} <= metrics
    value = {(r["model"], r["metric"]): r["value"] for r in report["rows"]}
    gain = value[("sft", "macro_f1")] - value[("base", "macro_f1")]
    assert value[("sft", "macro_f1_gain")] == pytest.approx(gain)
    assert value[("sft", "macro_f1_gain_low")] <= gain <= value[("sft", "macro_f1_gain_high")]
    assert ("base", "macro_f1_gain") not in value  # nor the baselines': only the models
    md = (result.output("eval") / "report.md").read_text()
    assert "| metric | majority | random | base | sft |" in md
    assert (result.output("eval") / "confusion-sft-sentiment4.png").stat().st_size > 1000
    assert (result.output("eval") / "macro_f1-sentiment4.png").is_file()


def test_evaluate_compare_to_names_one_of_its_models(run_pipeline, review_corpus):
    result = run_pipeline("name: ft\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  eval:
    plugin: evaluate
    inputs: {models: [base]}
    params: {tasks: ["builtin:sentiment4?n=40&test=10"], compare_to: bse}
""")
    assert result.code == 1  # the node fails, saying why
    assert "params.compare_to: 'bse' is not one of the models (base)" in result.out


def test_bf16_true_full_finetune_trains_in_bf16(run_pipeline, review_corpus):
    """bf16-true holds weights, gradients and optimizer state in bf16 (half of fp32's
    memory; the model is never put in fp32 first) and saves a bf16 artifact;
    activation checkpointing trains alongside."""
    from safetensors import safe_open

    result = run_pipeline("name: ft\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  sft:
    plugin: instruction-finetune
    inputs: {model: base.model}
    params:
      tasks: ["builtin:sentiment4?n=60&test=10"]
      trainer: {max_steps: 4, precision: bf16-true, activation_checkpointing: true}
      batch_size: 4
""")
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["sft"]["metrics"]
    assert math.isfinite(metrics["val_loss"]) and metrics["val_loss"] < 10
    with safe_open(str(result.output("sft") / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118


def test_real_tokens_leave_out_padding_only():
    examples = [Example(np.array([5, 6, 7]), np.array([8, 9])),
                Example(np.array([5]), np.array([8]))]
    _, y = collate(examples, pad_id=0)  # rows of 4: 4 real, then 1 real and 3 padding
    assert real_tokens(y) == 4 + 1
    assert real_tokens(torch.zeros(3, 7, dtype=torch.long)) == 21  # pretraining windows


def test_batches_deal_neighbours_in_length_apart():
    """Copies of an example (oversampling) are equally long: each lands in a batch
    of its own, and an epoch still uses every example once."""
    distinct = [Example(np.arange(n + 1), np.array([1])) for n in range(40)]
    batches = InstructionBatches([e for e in distinct for _ in range(4)], 8, 0, seed=3)
    epoch = batches._epoch(0)
    assert sorted(id(e) for b in epoch for e in b) == sorted(id(e) for e in batches.examples)
    assert all(len({len(e.prompt) for e in b}) == 8 for b in epoch)
    widths = [max(len(e.prompt) for e in b) - min(len(e.prompt) for e in b) for b in epoch]
    assert max(widths) < 40 // 2  # still batches of similar lengths


def test_oversampling_repeats_the_small_classes_up_to_the_largest():
    instances = [Instance(str(i), f"text {i}", (label,))
                 for i, label in enumerate("PPPPPPNNM")]
    counts = Counter(i.outputs[0] for i in oversampled(instances, seed=0))
    assert counts == {"P": 6, "N": 6, "M": 6}
    assert set(oversampled(instances, seed=0)) == set(instances)  # repeats, nothing new


def test_perplexity_is_exp_of_the_mean_next_token_loss():
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=50, context=16)).eval()
    x = torch.randint(0, 50, (3, 16))
    y = torch.randint(0, 50, (3, 16))
    y[0, :4] = IGNORE
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                                     ignore_index=IGNORE).exp()
    windows = list(zip(x, y, strict=True))
    assert perplexity(model, windows, batch_size=2) == pytest.approx(float(expected), rel=1e-5)
