"""Chat templates render exactly as transformers' ``apply_chat_template`` renders
them: the SmolLM2 (ChatML with a default system prompt), Llama 3 and Qwen 2.5
templates, kept here as strings."""

from __future__ import annotations

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
