"""Measuring models: label scoring, generation, and metrics through torchmetrics.

Classification picks, for each instance, the allowed label whose tokens have the
highest log-likelihood after the prompt (robust for small models), or parses a
free generation. Generation tasks are scored against every acceptable answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gptflow.ml.generate import generate, sample_batch
from gptflow.ml.instruct import IGNORE
from gptflow.ml.loss import head_loss, supervised_loss
from gptflow.ml.model import GPT, KVCache
from gptflow.ml.prompts import PromptFormat
from gptflow.ml.tasks import Task
from gptflow.ml.tokenizer import Tokenizer


@torch.inference_mode()
def label_log_likelihoods(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str],
                          labels: Sequence[str], prefix: str = " ") -> np.ndarray:
    """(N prompts, K labels): log p(prefix + label | prompt), summed over label tokens.

    Each prompt runs once, into a KV cache that its K labels then continue
    together: a prompt of P tokens costs P + K·(label length), not K·P."""
    label_ids = [torch.from_numpy(ids.astype(np.int64))
                 for ids in tokenizer.encode_batch([prefix + label for label in labels])]
    longest = max(len(ids) for ids in label_ids)
    targets = torch.full((len(labels), longest), IGNORE, dtype=torch.long)
    for k, ids in enumerate(label_ids):
        targets[k, :len(ids)] = ids
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    follow = targets[:, :-1].clamp(min=0).to(device)  # fed in after each first token
    keep = targets != IGNORE
    label_of = keep.nonzero()[:, 0]  # the label of each kept target
    kept_targets, keep = targets[keep].to(device), keep.to(device)
    scores = np.zeros((len(prompts), len(labels)))
    for n, encoded in enumerate(tokenizer.encode_batch(list(prompts))):
        prompt = torch.from_numpy(encoded[-(model.config.context - longest):].astype(np.int64))
        cache = KVCache(model.config, 1, len(prompt) + longest, device, dtype)
        last = model.hidden(prompt[None].to(device), cache)[:, -1]  # (1, C)
        h = last.expand(len(labels), -1)[:, None]  # (K, 1, C): predicts each first token
        if longest > 1:
            h = torch.cat([h, model.hidden(follow, cache.repeat(len(labels)), len(prompt))],
                          dim=1)
        nll = head_loss(model.lm_head, h[keep], kept_targets, "none")
        per_label = torch.zeros(len(labels), dtype=torch.float64).index_add_(
            0, label_of, nll.double().cpu())
        scores[n] = -per_label.numpy()
    return scores


def prompts_for(task: Task, texts: Sequence[str], prompt: PromptFormat, tokenizer: Tokenizer,
                k_examples: int | None = None) -> list[str]:
    """Prompts for ``texts`` as the model was tuned (through its chat template when it
    was tuned so); ``k_examples`` overrides its number of demonstrations."""
    return [prompt.render(task, text, k_examples, tokenizer) for text in texts]


def classify(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], labels: Sequence[str],
             prompt: PromptFormat | None = None) -> list[str]:
    """Each prompt's label: the allowed one with the highest log-likelihood."""
    prefix = (prompt or PromptFormat()).answer_prefix
    scores = label_log_likelihoods(model, tokenizer, prompts, labels, prefix=prefix)
    return [labels[j] for j in scores.argmax(axis=1)]


def generate_answers(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str],
                     max_new_tokens: int, batch_size: int = 1) -> list[str]:
    """Greedy continuations, cut at the first newline (decoding stops there);
    ``batch_size`` prompts of similar length decoded together."""
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, ids in zip(rows, sample_batch(model, [encoded[i] for i in rows], max_new_tokens,
                                             temperature=0, stop_id=tokenizer.eot_id,
                                             ends=tokenizer.line_breaks), strict=True):
            out[i] = tokenizer.decode(ids).strip().split("\n")[0].strip()
    return out


def classification_metrics(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]
                           ) -> tuple[dict[str, float], np.ndarray]:
    """accuracy, macro_f1 and f1_<label>, and the confusion matrix (rows: truth)."""
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
    )

    k = len(labels)
    p, g = (torch.from_numpy(a) for a in class_indices(preds, golds, labels))
    metrics = {"accuracy": float(MulticlassAccuracy(k, average="micro")(p, g)),
               "macro_f1": float(MulticlassF1Score(k, average="macro")(p, g))}
    per_class = MulticlassF1Score(k, average="none")(p, g)
    metrics.update({f"f1_{label}": float(v) for label, v in zip(labels, per_class, strict=True)})
    metrics.update(bootstrap_ci95(p.numpy(), g.numpy(), k))
    return metrics, MulticlassConfusionMatrix(k)(p, g).numpy()


def class_indices(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and truths as class indices; an answer outside the labels is
    counted as a wrong class."""
    index = {label: i for i, label in enumerate(labels)}
    g = np.array([index[x] for x in golds], dtype=np.int64)
    p = np.array([index.get(x, -1) for x in preds], dtype=np.int64)
    return np.where(p < 0, (g + 1) % len(labels), p), g


def bootstrap_draws(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(resamples, n) instance indices, each row drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def bootstrap_ci95(preds: np.ndarray, golds: np.ndarray, k: int) -> dict[str, float]:
    """Half-widths of the 95% bootstrap intervals of accuracy and macro-F1 (the
    instances drawn with replacement 1000 times): on a test split of 28
    instances one is 3.6 accuracy points, and a difference inside these is noise."""
    if len(golds) == 0:
        return {}
    accuracy, macro_f1 = resampled_scores(preds, golds, k, bootstrap_draws(len(golds)))

    def half_width(values: np.ndarray) -> float:
        high, low = np.percentile(values, [97.5, 2.5])
        return float(high - low) / 2

    return {"accuracy_ci95": half_width(accuracy), "macro_f1_ci95": half_width(macro_f1)}


def paired_gains(preds: np.ndarray, reference: np.ndarray, golds: np.ndarray, k: int
                 ) -> dict[str, float]:
    """Accuracy and macro-F1 of ``preds`` minus those of ``reference`` on the same
    instances, with the 95% interval of each gain over 1000 resamples that draw the
    same instances for both (paired bootstrap): two models scored on one small test
    split err on many of the same instances, so their difference is far less noisy
    than either score; a gain whose interval excludes 0 is not noise."""
    every = np.arange(len(golds))[None]  # row 0: the split itself, for the gain
    draws = np.concatenate([every, bootstrap_draws(len(golds))])
    ours, theirs = (resampled_scores(x, golds, k, draws) for x in (preds, reference))
    gains: dict[str, float] = {}
    for metric, mine, other in zip(("accuracy", "macro_f1"), ours, theirs, strict=True):
        gain = mine - other
        low, high = np.percentile(gain[1:], [2.5, 97.5])
        gains.update({f"{metric}_gain": float(gain[0]), f"{metric}_gain_low": float(low),
                      f"{metric}_gain_high": float(high)})
    return gains


def resampled_scores(preds: np.ndarray, golds: np.ndarray, k: int, draws: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 (R,) of the class indices ``preds`` and ``golds`` at each
    row of instance indices ``draws`` (R, N); macro-F1 averages the classes found in
    a row's truth or predictions, as torchmetrics does."""
    p, g = preds[draws], golds[draws]
    classes = np.arange(k)[:, None, None]
    predicted, true = p == classes, g == classes  # (k, R, N)
    tp = (predicted & true).sum(-1)
    wrong = (predicted ^ true).sum(-1)  # false positives + false negatives, (k, R)
    present = (tp + wrong) > 0
    f1 = 2 * tp / np.maximum(2 * tp + wrong, 1)
    return (p == g).mean(-1), (f1 * present).sum(0) / present.sum(0)


def generation_metrics(preds: Sequence[str], refs: Sequence[Sequence[str]], translation: bool
                       ) -> dict[str, float]:
    """exact_match (SQuAD normalisation) and rouge_l against the best reference;
    bleu and chrf as well for translation."""
    from torchmetrics.text import CHRFScore, ROUGEScore, SacreBLEUScore, SQuAD

    squad = SQuAD()(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
        [{"answers": {"text": list(r), "answer_start": [0] * len(r)}, "id": str(i)}
         for i, r in enumerate(refs)])
    rouge = ROUGEScore(rouge_keys="rougeL", accumulate="best")(list(preds),
                                                               [list(r) for r in refs])
    metrics = {"exact_match": float(squad["exact_match"]) / 100,
               "rouge_l": float(rouge["rougeL_fmeasure"])}
    if translation:
        width = max(len(r) for r in refs)  # sacrebleu wants the same number of references
        padded = [list(r) + [r[0]] * (width - len(r)) for r in refs]
        metrics["bleu"] = float(SacreBLEUScore()(list(preds), padded))
        metrics["chrf"] = float(CHRFScore()(list(preds), padded))
    return metrics


def baselines(train_golds: Sequence[str], test_golds: Sequence[str], labels: Sequence[str],
              seed: int = 0) -> dict[str, dict[str, float]]:
    """The majority class of the training split, and uniform random guessing."""
    counts = {label: list(train_golds or test_golds).count(label) for label in labels}
    majority = max(labels, key=lambda label: counts[label])
    rng = np.random.default_rng(seed)
    guesses = [labels[i] for i in rng.integers(0, len(labels), len(test_golds))]
    return {"majority": classification_metrics([majority] * len(test_golds), test_golds,
                                               labels)[0],
            "random": classification_metrics(guesses, test_golds, labels)[0]}


@torch.inference_mode()
def perplexity(model: GPT, windows: Any, batch_size: int = 8, max_batches: int = 200) -> float:
    """exp of the mean next-token NLL over validation windows, through the
    chunked head (no (B, T, V) logits: a 49k vocabulary at 1024 tokens would
    hold 1.6 GB of them per batch)."""
    total, count = 0.0, 0
    loader = torch.utils.data.DataLoader(windows, batch_size=batch_size)
    for i, (x, y) in enumerate(loader):
        if i >= max_batches:
            break
        total += float(supervised_loss(model, x, y, reduction="sum"))
        count += int((y != IGNORE).sum())
    return math.exp(total / count) if count else math.nan


@torch.inference_mode()
def generation_speed(model: GPT, tokenizer: Tokenizer, new_tokens: int = 64) -> float:
    """Tokens/s of sampling at batch 1 with the KV cache."""
    prompt = tokenizer.encode("The")
    n = min(new_tokens, model.config.context - len(prompt))
    generate(model, prompt, 4, temperature=1.0, seed=0)  # warm-up: first calls are slow
    start = time.perf_counter()
    out = generate(model, prompt, n, temperature=1.0, seed=0)
    return len(out) / (time.perf_counter() - start) if out else math.nan
