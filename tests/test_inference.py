"""The inference form of a model: the same outputs, faster layouts."""

from __future__ import annotations

import pytest
import torch

from gptflow.ml.config import preset_config
from gptflow.ml.generate import generate
from gptflow.ml.inference import DecodeLinear, TiedEmbedding, for_inference
from gptflow.ml.model import GPT
from gptflow.ml.quant import Int4Linear, quantize_model


def tiny(tie: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(preset_config("tiny", vocab_size=101, n_kv_head=2, tie_embeddings=tie)).eval()


def test_transposed_dense_layers_give_the_same_logits_and_tokens():
    for tie in (True, False):
        model, served = tiny(tie), for_inference(tiny(tie))
        assert isinstance(served.blocks[0].mlp.up_proj, DecodeLinear)
        assert isinstance(served.lm_head, DecodeLinear)
        if tie:  # the table is stored once: the embedding reads the head's
            assert isinstance(served.embed, TiedEmbedding) and served.embed.head is served.lm_head
            assert served.num_params() == model.num_params()
        x = torch.randint(0, 101, (2, 20))
        with torch.no_grad():
            assert torch.allclose(served(x), model(x), atol=1e-5)
        prompt = [5, 17, 3]
        assert generate(served, prompt, 12, temperature=0) == \
            generate(model, prompt, 12, temperature=0)


def test_quantized_layers_keep_their_kernels():
    model = tiny(True)
    quantize_model(model, "int4", 32)
    for_inference(model)
    assert isinstance(model.blocks[0].attn.q_proj, Int4Linear)
    assert model.blocks[0].attn.q_proj.keep_packed
    assert isinstance(model.lm_head, DecodeLinear)  # the tied head, left in full precision


def test_a_model_in_inference_form_is_not_saved(tmp_path):
    from gptflow.ml.checkpoint import save_model
    from gptflow.ml.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="inference form"):
        save_model(tmp_path / "m", for_inference(tiny(True)), Tokenizer.train_char(["ab"]))
    assert not (tmp_path / "m").exists()
