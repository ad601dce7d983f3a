"""Knowledge distillation: the loss by hand, alpha=0, a frozen teacher, one tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BASE

from gptflow.ml.config import preset_config
from gptflow.ml.distill import DistillLM, kd_loss, layers_kept, student_from_teacher
from gptflow.ml.loss import token_loss
from gptflow.ml.model import GPT
from gptflow.ml.optim import Optim


def identity_heads(vocab: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """Heads whose logits are the hidden states they are given."""
    head = torch.nn.Linear(vocab, vocab, bias=False)
    torch.nn.init.eye_(head.weight)
    return head, head


def test_kd_loss_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, -100])  # the second position: the soft term only

    def kl(s: list[float], t: list[float]) -> float:
        ps = [math.exp(v / 2) / sum(math.exp(u / 2) for u in s) for v in s]
        pt = [math.exp(v / 2) / sum(math.exp(u / 2) for u in t) for v in t]
        return sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True)) * 2.0**2

    total, soft, hard = kd_loss(student, teacher, targets, identity_heads(3), alpha=0.25,
                                temperature=2.0)
    expected_soft = (kl(*[r.tolist() for r in (student[0], teacher[0])])
                     + kl(*[r.tolist() for r in (student[1], teacher[1])])) / 2
    ce = -math.log(math.exp(1.0) / (math.exp(1.0) + 1 + math.exp(-1.0)))
    assert soft.item() == pytest.approx(expected_soft, rel=1e-5)
    assert hard.item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(0.25 * expected_soft + 0.75 * ce, rel=1e-5)


def test_kd_loss_gradients_equal_the_unchunked_loss(monkeypatch):
    torch.manual_seed(0)
    student = torch.randn(7, 11, requires_grad=True)
    teacher, targets = torch.randn(7, 11), torch.randint(0, 11, (7,))
    targets[:3] = -100
    heads = identity_heads(11)
    monkeypatch.setattr("gptflow.ml.loss.CHUNK_ELEMENTS", 2 * 11)  # chunks of 2 rows
    total, _, _ = kd_loss(student, teacher, targets, heads, alpha=0.5, temperature=2.0)
    (grad,) = torch.autograd.grad(total, student)
    s = student.detach().requires_grad_()
    soft = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(teacher / 2, -1), log_target=True,
                    reduction="batchmean") * 4
    reference = 0.5 * soft + 0.5 * F.cross_entropy(s, targets)
    (expected,) = torch.autograd.grad(reference, s)
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_alpha_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(10, 11), torch.randn(10, 11)
    targets = torch.randint(0, 11, (10,))
    total, _, _ = kd_loss(student, teacher, targets, identity_heads(11), alpha=0.0,
                          temperature=3.0)
    assert torch.allclose(total, F.cross_entropy(student, targets))


def test_alpha_zero_trains_without_running_the_teacher():
    torch.manual_seed(0)
    student = GPT(preset_config("tiny", vocab_size=50, d_model=32, n_head=2))

    class Absent(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("the teacher ran")

    module = DistillLM(student, Absent(), Optim(lr=1e-2, warmup_steps=0), 5, 0.0, 2.0)
    module.log = lambda *a, **k: None  # no trainer attached in this unit test
    x = torch.randint(0, 50, (4, 17))
    loss = module.training_step((x[:, :-1], x[:, 1:]), 0)
    assert torch.allclose(loss, token_loss(student(x[:, :-1]), x[:, 1:]))


def test_example_weighting_gives_each_rows_answer_one_weight():
    """loss_weight: example — the hard term (and plain training, alpha 0) is the mean
    over rows of each row's mean cross-entropy, for answers of 8, 1 and 4 tokens."""
    torch.manual_seed(0)
    teacher = GPT(preset_config("tiny", vocab_size=50))
    student = GPT(preset_config("tiny", vocab_size=50, d_model=32, n_head=2))
    x = torch.randint(0, 50, (3, 17))
    y = x[:, 1:].clone()
    for row, answer in enumerate((8, 1, 4)):
        y[row, :16 - answer] = -100
    x = x[:, :-1]
    expected = torch.stack([token_loss(student(x[r:r + 1]), y[r:r + 1]) for r in range(3)]).mean()
    assert not torch.allclose(expected, token_loss(student(x), y))
    logged: dict[str, torch.Tensor] = {}
    module = DistillLM(student, teacher, Optim(), 5, 0.5, 2.0, "example")
    module.log_dict = lambda values, **k: logged.update(values)
    module.training_step((x, y), 0)
    assert torch.allclose(logged["ce_loss"], expected, atol=1e-5)
    plain = DistillLM(student, teacher, Optim(), 5, 0.0, 2.0, "example")
    plain.log = lambda *a, **k: None
    assert torch.allclose(plain.training_step((x, y), 0), expected, atol=1e-5)


def test_only_the_student_learns():
    torch.manual_seed(0)
    teacher = GPT(preset_config("tiny", vocab_size=50))
    student = GPT(preset_config("tiny", vocab_size=50, d_model=32, n_head=2))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillLM(student, teacher, Optim(lr=1e-2, warmup_steps=0), 5, 0.5, 2.0)
    opt = module.configure_optimizers()["optimizer"]
    assert all(p.data_ptr() not in {q.data_ptr() for q in teacher.parameters()}
               for g in opt.param_groups for p in g["params"])
    x = torch.randint(0, 50, (4, 17))
    student_before = [p.clone() for p in student.parameters()]
    module.log_dict = lambda *a, **k: None  # no trainer attached in this unit test
    for _ in range(3):
        loss = module.training_step((x[:, :-1], x[:, 1:]), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(),
                                                     strict=True))


def test_distill_node_and_tokenizer_mismatch(run_pipeline, review_corpus, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a completely different corpus " * 40)
    text = "name: kd\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  student:
    plugin: distill
    inputs: {teacher: base, tokens: tok.tokens}
    params:
      model: {preset: tiny, d_model: 32, n_head: 2, context: 96}
      trainer: {max_steps: 8}
      batch_size: 8
"""
    result = run_pipeline(text)
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["student"]["metrics"]
    assert metrics["param_ratio"] < 0.5
    assert {"kd_loss", "ce_loss", "val_loss", "gen_tokens_per_s"} <= set(metrics)
    mismatch = text + f"""\
  tok2: {{plugin: tokenize, params: {{corpus: ["{other}"], tokenizer: char, split: tail}}}}
  bad:
    plugin: distill
    inputs: {{teacher: base, tokens: tok2.tokens}}
    params: {{trainer: {{max_steps: 2}}, batch_size: 4}}
"""
    failed = run_pipeline(mismatch)
    assert failed.code == 1
    assert "the teacher's tokenizer differs" in failed.out


def test_distill_on_task_data_stores_its_prompt_format(run_pipeline,
                                                        review_corpus):
    text = "name: kd-tasks\nnodes:\n" + TINY_BASE.format(corpus=review_corpus) + """\
  student:
    plugin: distill
    inputs: {teacher: base}
    params:
      tasks: ["builtin:sentiment4?n=80&test=10"]
      k_examples: 1
      model: {preset: tiny, d_model: 32, n_head: 2, context: 96}
      trainer: {max_steps: 4}
      batch_size: 8
  eval:
    plugin: evaluate
    inputs: {models: [student.model]}
    params: {tasks: ["builtin:sentiment4?n=80&test=10"]}
"""
    result = run_pipeline(text)
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["student"]["metrics"]
    assert metrics["train_examples"] > 0 and metrics["param_ratio"] < 0.5
    config = json.loads((result.output("student") / "config.json").read_text())
    assert config["prompt"]["k_examples"] == 1  # evaluate prompts it as it was trained

    kept = run_pipeline(text.replace("model: {preset: tiny, d_model: 32, n_head: 2, context: 96}",
                                     "keep_layers: 1"))
    assert kept.code == 0, kept.out + kept.err
    assert json.loads((kept.output("student") / "config.json").read_text())["n_layer"] == 1

    both = text.replace("inputs: {teacher: base}", "inputs: {teacher: base, tokens: tok.tokens}")
    failed = run_pipeline(both)
    assert failed.code == 1 and "one kind of data" in failed.out


def test_a_student_from_the_teacher_keeps_evenly_spaced_blocks():
    torch.manual_seed(0)
    teacher = GPT(preset_config("tiny", vocab_size=50, n_layer=6)).eval()
    assert layers_kept(6, 3) == [0, 2, 5] and layers_kept(30, 8)[-1] == 29
    student = student_from_teacher(teacher, 3)
    assert student.config.n_layer == 3 and len(student.blocks) == 3
    for mine, theirs in zip(student.blocks, [teacher.blocks[i] for i in (0, 2, 5)], strict=True):
        for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # copies
    assert torch.equal(student.embed.weight, teacher.embed.weight)
    whole = student_from_teacher(teacher, 6)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert torch.equal(whole(x), teacher(x))  # every block kept: the teacher itself
    with pytest.raises(ValueError, match="keep_layers 7"):
        student_from_teacher(teacher, 7)
