"""Chat templates render exactly as transformers' ``apply_chat_template`` renders
them: the SmolLM2 (ChatML with a default system prompt), Llama 3 and Qwen 2.5
templates, kept here as strings."""

from __future__ import annotations

import json

import pytest
from conftest import SMOLLM2_TEMPLATE

from gptflow.ml.tokenizer import Tokenizer, TokenizerConfig

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")

QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) "
    "or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  Answer in one word.  "},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"},
     {"role": "user", "content": "And of Italy?"}],
]


@pytest.mark.parametrize("template", [SMOLLM2_TEMPLATE, LLAMA3_TEMPLATE, QWEN25_TEMPLATE],
                         ids=["smollm2", "llama3", "qwen2.5"])
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_template_renders_as_transformers(template, generation_prompt, conversation):
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra)")
    base = Tokenizer.train_bpe(["hello world"] * 10, vocab_size=270, min_frequency=1)
    ours = Tokenizer(base.hf, TokenizerConfig(bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>",
                                              chat_template=template))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=base.hf,
                                                  bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>")
    expected = theirs.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                          add_generation_prompt=generation_prompt)
    assert ours.render_chat(conversation, generation_prompt) == expected


def test_a_template_can_refuse_a_conversation():
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}"
                "{% endif %}{{ messages | tojson }}")
    tok = Tokenizer(Tokenizer.train_char(["ab"]).hf, TokenizerConfig(chat_template=template))
    assert tok.render_chat([{"role": "user", "content": "é"}]) == \
        '[{"role": "user", "content": "é"}]'
    with pytest.raises(Exception, match="user first"):
        tok.render_chat([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.train_char(["ab"]).render_chat([])


@pytest.mark.parametrize(("template", "expected"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "loops over more than 1,048,576 items"),
    ("{% set s = namespace(v='ab') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}"
     "{% endfor %}{{ s.v }}", "builds a value of more than 4,194,304 items"),
    ("{{ 'ab' * 10000000000 }}", "builds a value of more than 4,194,304 items"),
    ("{{ 10000000000 * 'ab' }}", "builds a value of more than 4,194,304 items"),
    ("{% for i in range(90000) %}{{ 'x' * 1000 }}{% endfor %}",
     "writes more than 4,194,304 characters"),
    ("{{ 7 ** 100000000 }}", "refuses 7 ** 100000000"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ messages[0].content.__class__ }}{% if 1 %}", "model chat template: "),
])
def test_a_model_chat_template_renders_within_bounds_or_says_it(template, expected):
    """A template comes with someone else's model file: its loops, strings and output
    are bounded, and what it breaks is said to be the template's."""
    import time

    tok = Tokenizer(Tokenizer.train_char(["ab"]).hf, TokenizerConfig(chat_template=template))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"^model chat template: ") as e:
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - started < 5


def test_chat_format_tunes_and_evaluates_through_the_template(run_pipeline, tmp_path):
    """format: chat: NI prompts go through the model's chat template as a user turn,
    the answer is the assistant's, and evaluate prompts the tuned model the same way."""
    from tokenizers import AddedToken

    from gptflow.ml.checkpoint import save_model
    from gptflow.ml.config import preset_config
    from gptflow.ml.instruct import encode_examples
    from gptflow.ml.model import GPT
    from gptflow.ml.prompts import PromptFormat
    from gptflow.ml.tasks import sentiment4

    base = Tokenizer.train_bpe([i.input for i in sentiment4(n=100, test=10).instances],
                               vocab_size=400, min_frequency=1)
    base.hf.add_special_tokens([AddedToken(t, special=True)
                                for t in ("<|im_start|>", "<|im_end|>")])
    tok = Tokenizer(base.hf, TokenizerConfig(eos_token="<|im_end|>",
                                             chat_template=SMOLLM2_TEMPLATE))
    task = sentiment4(n=20, test=4)
    (example, *_) = encode_examples([task], tok, "train", 512, PromptFormat(chat=True))
    prompt = tok.decode(example.prompt, skip_special=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("assistant\n")
    assert tok.decode(example.target, skip_special=False).endswith("<|im_end|>")
    assert not tok.decode(example.target).startswith(" ")  # no space after the header

    save_model(tmp_path / "m", GPT(preset_config("tiny", vocab_size=tok.vocab_size,
                                                 context=256)), tok)
    tasks = '["builtin:sentiment4?n=40&test=8"]'
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Rate review {k}."},
        {"role": "assistant", "content": "Positive"}]}) + "\n" for k in range(20)))
    text = f"""\
name: chat
nodes:
  base: {{plugin: load-model, params: {{path: '{tmp_path / "m"}'}}}}
  sft:
    plugin: instruction-finetune
    inputs: {{model: base}}
    params: {{tasks: {tasks}, chats: ['{chats}'], format: chat, trainer: {{max_steps: 2}},
             batch_size: 4}}
  eval:
    plugin: evaluate
    inputs: {{models: [sft]}}
    params: {{tasks: {tasks}, max_instances: 4}}
"""
    result = run_pipeline(text)
    assert result.code == 0, result.out + result.err
    assert result.record["nodes"]["sft"]["metrics"]["train_examples"] > 32  # tasks + chats
    config = (result.output("sft") / "config.json").read_text()
    assert '"chat": true' in config
    save_model(tmp_path / "plain", GPT(preset_config("tiny", vocab_size=base.vocab_size,
                                                     context=256)), Tokenizer(base.hf))
    plain = run_pipeline(text.replace(str(tmp_path / "m"), str(tmp_path / "plain")))
    assert plain.code == 1
    assert "chat data needs a model with a chat template" in plain.out

    as_chat = ("name: as-chat\nnodes:\n  base: {plugin: load-model, params: {path: 'MODEL', "
               "format: chat}}\n  eval: {plugin: evaluate, inputs: {models: [base]}, "
               f"params: {{tasks: {tasks}, max_instances: 4}}}}\n")
    loaded = run_pipeline(as_chat.replace("MODEL", str(tmp_path / "m")))
    assert loaded.code == 0, loaded.out + loaded.err
    assert '"chat": true' in (loaded.output("base") / "config.json").read_text()
    refused = run_pipeline(as_chat.replace("MODEL", str(tmp_path / "plain")))
    assert refused.code == 1 and "format: chat needs a chat template" in refused.out


def test_chat_data_puts_the_loss_on_assistant_turns(tmp_path):
    """messages JSONL: one example per assistant turn, its history (through the
    template, with the assistant header) as the prompt, the reply + EOS as the target."""
    from tokenizers import AddedToken

    from gptflow.ml.instruct import collate, encode_conversations
    from gptflow.ml.tasks import load_conversations

    base = Tokenizer.train_bpe(["hello there, how are you? fine thanks"] * 10, vocab_size=300,
                               min_frequency=1)
    base.hf.add_special_tokens([AddedToken(t, special=True)
                                for t in ("<|im_start|>", "<|im_end|>")])
    tok = Tokenizer(base.hf, TokenizerConfig(eos_token="<|im_end|>",
                                             chat_template=SMOLLM2_TEMPLATE))
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"},
            {"role": "user", "content": "how are you?"},
            {"role": "assistant", "content": "fine, thanks"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(__import__("json").dumps(r) for r in [
        {"messages": chat, "split": "train"}, {"messages": chat[:2], "split": "val"}]))
    train = load_conversations(path, "train")
    assert train == [chat] and load_conversations(path, "val") == [chat[:2]]
    examples = encode_conversations(train, tok, 512)
    assert len(examples) == 2  # both assistant turns
    for example, reply, history in zip(examples, ("hi there", "fine, thanks"), (1, 3),
                                       strict=True):
        assert tok.decode(example.target, skip_special=False) == reply + "<|im_end|>"
        assert tok.decode(example.prompt, skip_special=False) == tok.render_chat(chat[:history])
    _, y = collate(examples, tok.pad_id)
    supervised = [tok.decode([int(t) for t in row if t != -100], skip_special=False)
                  for row in y]
    assert supervised == ["hi there<|im_end|>", "fine, thanks<|im_end|>"]
    path.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"chats.jsonl:1: messages must be a list"):
        load_conversations(path, "train")
