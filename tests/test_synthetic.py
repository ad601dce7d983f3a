"""Synthetic data: filters, targets, the reversed task, and the node end to end."""

from __future__ import annotations

import json
from collections import Counter

from gptflow.ml.synthetic import Filters, NearDuplicates, _reject, normalize, targets
from gptflow.ml.tasks import reversed_task, sentiment4


def test_exact_and_near_duplicates_are_rejected():
    real = "The battery lasts all day and the screen is bright, I love it."
    near = NearDuplicates(3)
    near.add(real)
    seen = {normalize(real)}
    filters = Filters(min_chars=5, max_chars=200, near_duplicate=0.6)
    assert _reject("the battery lasts ALL day and the screen is bright  i love it", filters,
                   seen, near) == "exact duplicate"
    assert _reject("The battery lasts all day and the screen is bright, I adore it.", filters,
                   seen, near) == "near duplicate"
    assert near.similarity("Shipping was slow and the box arrived crushed.") == 0.0
    assert _reject("Shipping was slow and the box arrived crushed.", filters, seen, near) is None
    assert _reject("ok", filters, seen, near) == "too short"
    assert _reject("x" * 300, filters, seen, near) == "too long"


def test_targets_balance_to_the_largest_class_or_to_given_counts():
    counts = {"Positive": 40, "Negative": 30, "Mixed": 2}
    assert targets(counts, True, {}) == {"Positive": 0, "Negative": 10, "Mixed": 38}
    assert targets(counts, False, {"Mixed": 20}) == {"Positive": 0, "Negative": 0, "Mixed": 18}


def test_reversed_task_swaps_input_and_output_and_keeps_splits():
    task = sentiment4(n=40, test=8)
    backwards = reversed_task(task)
    assert [i.input for i in backwards.instances] == [i.outputs[0] for i in task.instances]
    assert [i.split for i in backwards.instances] == [i.split for i in task.instances]
    assert backwards.examples[0] == (task.examples[0][1], task.examples[0][0])


SYNTH_PIPELINE = """\
name: balance
nodes:
{base}  gen:
    plugin: instruction-finetune
    inputs: {{model: base.model}}
    params: {{tasks: ["{task}"], reverse: true, trainer: {{max_steps: 5}}, batch_size: 8}}
  synth:
    plugin: generate-synthetic-data
    inputs: {{generator: gen.model, classifier: {classifier}}}
    params: {{tasks: ["{task}"], max_new_tokens: 12, min_chars: 1, near_duplicate: 1.0,
             max_attempts: {attempts}}}
  clf:
    plugin: instruction-finetune
    inputs: {{model: base.model, data: [synth.dataset]}}
    params: {{trainer: {{max_steps: 3}}, batch_size: 8}}
"""


def test_node_balances_classes_and_marks_provenance(run_pipeline, review_corpus):
    from conftest import TINY_BASE

    task = "builtin:sentiment4?n=120&test=20&Mixed=0.05"
    result = run_pipeline(SYNTH_PIPELINE.format(base=TINY_BASE.format(corpus=review_corpus),
                                                task=task, classifier="base.model",
                                                attempts=1.0))
    assert result.code == 0, result.err
    report = json.loads((result.output("synth") / "report.json").read_text())["sentiment4"]
    assert report["generated"] == sum(max(report["before"].values()) - n
                                      for n in report["before"].values())  # one try each
    assert report["kept"] + sum(report["rejected"].values()) == report["generated"]
    records = [json.loads(line) for line in
               (result.output("synth") / "sentiment4.jsonl").read_text().splitlines()]
    real = [r for r in records if not r["synthetic"]]
    made = [r for r in records if r["synthetic"]]
    assert len(real) == 140 and len(made) == report["kept"]
    assert {r["split"] for r in made} <= {"train"}
    original = sentiment4(n=120, test=20, Mixed=0.05)
    assert [(r["input"], r["split"]) for r in real] == [(i.input, i.split)
                                                        for i in original.instances]
    assert result.record["nodes"]["clf"]["status"] == "ran"

    # without a classifier and with attempts to spare, every class reaches the largest
    result = run_pipeline(SYNTH_PIPELINE.format(base=TINY_BASE.format(corpus=review_corpus),
                                                task=task, classifier="[]", attempts=4.0)
                          .replace("classifier: [], ", "").replace(", classifier: []", ""))
    assert result.code == 0, result.err
    records = [json.loads(line) for line in
               (result.output("synth") / "sentiment4.jsonl").read_text().splitlines()]
    counts = Counter(r["outputs"][0] for r in records if r["split"] == "train")
    assert len(set(counts.values())) == 1, counts
    assert (result.output("synth") / "counts.png").stat().st_size > 0
