"""Hugging Face interoperability. Parity with ``transformers`` runs where the
``hf`` extra is installed (tox env ``hf``); the round trips and the errors need
only plain files and always run."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gptflow.ml.checkpoint import load_model, save_model
from gptflow.ml.config import preset_config
from gptflow.ml.families import read_family
from gptflow.ml.generate import generate
from gptflow.ml.hf import HFError, export_hf, import_hf
from gptflow.ml.model import GPT, scale_rope
from gptflow.ml.tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Numbers 12345.",
         "Tokenizers split text into pieces; models predict the next one."] * 20
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXTS, vocab_size=300)


def gptflow_model(family: str, tokenizer: Tokenizer, **overrides: object) -> GPT:
    switches = (dict(position="learned", norm="layernorm", mlp="gelu", bias=True)
                if family == "gpt2" else dict(n_kv_head=2, rope_theta=500000.0))
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", vocab_size=tokenizer.vocab_size, **{**switches,
                                                                          **overrides}))
    with torch.no_grad():  # non-trivial norms and biases, so a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def transformers_or_none() -> object | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


CASES = [("gpt2", {}), ("gpt2", {"tie_embeddings": False}), ("llama", {}),
         ("llama", {"tie_embeddings": False, "n_kv_head": 1}),
         ("llama", {"rope_scaling": LLAMA3_SCALING})]


@pytest.mark.parametrize(("family", "overrides"), CASES)
def test_export_then_import_is_exact(tmp_path, tokenizer, family, overrides):
    model = gptflow_model(family, tokenizer, **overrides)
    assert export_hf(model, tokenizer, tmp_path / "hf") == family
    config, state, loaded_tokenizer, found = import_hf(tmp_path / "hf")
    assert found == family and config.ff_dim == model.config.ff_dim
    assert replace(config, d_ff=None) == replace(model.config, d_ff=None)
    again = GPT(config)
    again.load_state_dict(state, strict=not config.tie_embeddings)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20))
    assert torch.equal(logits(again.eval(), ids), logits(model, ids))
    assert loaded_tokenizer.encode(TEXTS[1]) == tokenizer.encode(TEXTS[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_folder_claiming_a_million_layers_is_refused_before_any_is_built(tmp_path,
                                                                          tokenizer, family):
    import time

    export_hf(gptflow_model(family, tokenizer), tokenizer, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["n_layer" if family == "gpt2" else "num_hidden_layers"] = 10**6
    path.write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(HFError, match=r"config\.json claims 1,000,000 layers; the tensors hold"):
        import_hf(tmp_path / "hf")
    assert time.perf_counter() - started < 2


class _Payload:
    """What a malicious pickle would run on load; weights_only never lets it."""

    def __reduce__(self):
        return (print, ("ran code from a model file",))


def test_a_pickle_with_code_in_it_is_refused_in_one_line(tmp_path, tokenizer, capfd):
    from gptflow.cli import main

    export_hf(gptflow_model("llama", tokenizer), tokenizer, tmp_path / "hf")
    state = {"x": torch.zeros(1), "payload": _Payload()}
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(HFError, match=r"pytorch_model.bin: refused: the pickle holds Python "
                                      r"objects besides tensors"):
        import_hf(tmp_path / "hf")
    capfd.readouterr()
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "x"]) == 2
    out, err = capfd.readouterr()
    assert len(err.strip().splitlines()) == 1 and "refused" in err, err
    assert "ran code" not in out + err and "weights_only" not in err


def test_unmappable_configs_name_the_field(tmp_path, tokenizer):
    with pytest.raises(HFError, match="model_type: 'mamba' is not supported"):
        read_family({"model_type": "mamba"}, "x/config.json")
    with pytest.raises(HFError, match="activation_function: 'relu'"):
        read_family({"model_type": "gpt2", "activation_function": "relu", "vocab_size": 10,
                        "n_layer": 1, "n_head": 1, "n_embd": 8}, "x/config.json")
    llama = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
             "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(HFError, match=r"rope_scaling\.rope_type 'yarn' is not supported"):
        read_family({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "x")
    with pytest.raises(HFError, match="intermediate_size: missing"):
        read_family({k: v for k, v in llama.items() if k != "intermediate_size"}, "x")
    with pytest.raises(HFError, match="mlp_bias"):
        read_family({**llama, "attention_bias": True}, "x")
    with pytest.raises(HFError, match="norm=rmsnorm"):  # no HF architecture computes this mix
        export_hf(gptflow_model("gpt2", tokenizer, norm="rmsnorm"), tokenizer, tmp_path / "m")


def test_llama3_rope_scaling_keeps_high_and_divides_low_frequencies():
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    scaled = scale_rope(inv_freq, LLAMA3_SCALING)
    wavelength = 2 * torch.pi / inv_freq  # original context 32: short < 8, long > 32
    assert torch.equal(scaled[wavelength < 8], inv_freq[wavelength < 8])
    assert torch.allclose(scaled[wavelength > 32], inv_freq[wavelength > 32] / 8)
    between = (wavelength >= 8) & (wavelength <= 32)
    assert between.any() and (scaled[between] < inv_freq[between]).all()
    assert (scaled[between] > inv_freq[between] / 8).all()
    assert scale_rope(inv_freq, {"rope_type": "linear", "factor": 2.0}).equal(inv_freq / 2)


def test_load_model_node_and_export_verb(run_pipeline, tmp_path, tokenizer, capfd):
    from gptflow.cli import main

    export_hf(gptflow_model("llama", tokenizer), tokenizer, tmp_path / "hf")
    result = run_pipeline(f"""
name: from-hf
nodes:
  llama: {{plugin: load-model, params: {{path: "{tmp_path / 'hf'}"}}}}
  int8: {{plugin: quantize, inputs: {{model: llama.model}}, params: {{method: int8}}}}
""")
    assert result.code == 0, result.err
    assert result.record["nodes"]["llama"]["metrics"]["family"] == "llama"
    imported, _ = load_model(result.output("llama"))
    ids = torch.randint(0, tokenizer.vocab_size, (1, 16))
    assert torch.equal(logits(imported, ids), logits(gptflow_model("llama", tokenizer), ids))

    capfd.readouterr()  # gptflow generate reads a Hugging Face folder directly
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "The", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capfd.readouterr().out.startswith("The")

    out = tmp_path / "exported"
    store = str(result.store.root)
    capfd.readouterr()
    assert main(["export", f"{result.record['run_id']}:int8", "--to", str(out),
                 "--store", store]) == 0
    assert "de-quantized to float32" in capfd.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert main(["export", str(result.output("llama")), "--to", str(out)]) == 2  # not empty
    assert "exists and is not empty" in capfd.readouterr().err
    assert not list(tmp_path.glob(".*partial"))


def test_from_hf_pipeline_tunes_and_evaluates_an_imported_model(run_pipeline, tmp_path,
                                                                 tokenizer, capfd):
    export_hf(gptflow_model("gpt2", tokenizer), tokenizer, tmp_path / "hf")
    shipped = (Path(__file__).parent.parent / "pipelines" / "from-hf.yaml").read_text()
    result = run_pipeline(shipped, "--set", f"vars.model={tmp_path / 'hf'}",
                          "--set", "vars.tasks=builtin:sentiment4?n=100&test=20",
                          "--set", "lora.params.trainer.max_steps=4",
                          "--set", "eval.params.max_instances=8")
    assert result.code == 0, result.err
    rows = json.loads((result.output("eval") / "report.json").read_text())["rows"]
    assert {r["model"] for r in rows} >= {"base", "lora"}
    merged, _ = load_model(result.output("merged"))
    assert merged.config.position == "learned"
    from gptflow.cli import main

    capfd.readouterr()  # a GPT-2 adapter has no exact PEFT form: it exports merged
    assert main(["export", f"{result.record['run_id']}:lora", "--to", str(tmp_path / "out"),
                 "--store", str(result.store.root)]) == 0
    assert "gpt2 (the adapter merged into its base)" in capfd.readouterr().out
    exported = transformers_or_none()
    if exported is not None:
        theirs = exported.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        ids = torch.randint(0, tokenizer.vocab_size, (1, 12))
        assert torch.allclose(logits(theirs, ids), logits(merged, ids), atol=1e-4)


# -- parity with transformers ----------------------------------------------------------
@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="the hf extra is not installed "
                               "(pip install 'gptflow[hf]'; tox -e hf)")


def hf_model(transformers, family: str, vocab: int, tied: bool, kv_heads: int = 2
             ) -> torch.nn.Module:
    torch.manual_seed(1)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                         n_head=4, tie_word_embeddings=tied)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "gemma3":  # a window of 4 on two of three layers, two RoPE bases
        config = transformers.Gemma3TextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
            query_pre_attn_scalar=12, max_position_embeddings=64, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 5000.0}},
            tie_word_embeddings=tied)
        model = transformers.Gemma3ForCausalLM(config)
    else:
        kind = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral",
                "mistral-window": "Mistral"}[family]
        extra = {"qwen3": dict(head_dim=16), "mistral": dict(sliding_window=None),
                 "mistral-window": dict(sliding_window=4)}.get(family, {})
        config = getattr(transformers, f"{kind}Config")(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
            rope_theta=5000.0, tie_word_embeddings=tied, **extra)
        model = getattr(transformers, f"{kind}ForCausalLM")(config)
    with torch.no_grad():  # random norms and biases too
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


HF_CASES = [("gpt2", True, 4), ("gpt2", False, 4), ("llama", True, 2), ("llama", False, 1),
            ("llama", False, 4), ("qwen2", True, 2), ("qwen2", False, 4), ("qwen3", True, 2),
            ("qwen3", False, 1), ("mistral", False, 2), ("mistral-window", False, 2),
            ("gemma3", True, 2), ("gemma3", False, 1)]


@pytest.mark.parametrize(("family", "tied", "kv_heads"), HF_CASES)
def test_transformers_model_imports_with_equal_logits(transformers, tmp_path, tokenizer, family,
                                                      tied, kv_heads):
    """Each family's tiny random model, imported, then exported back: equal logits
    (1e-4) both ways, the same greedy tokens."""
    theirs = hf_model(transformers, family, tokenizer.vocab_size, tied, kv_heads)
    theirs.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf" / "tokenizer.json")
    config, state, _, _ = import_hf(tmp_path / "hf")
    ours = GPT(config)
    ours.load_state_dict(state, strict=not config.tie_embeddings)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    assert torch.allclose(logits(ours.eval(), ids), logits(theirs, ids), atol=1e-4)
    prompt = ids[0, :5].tolist()
    expected = theirs.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                               pad_token_id=0)[0, 5:].tolist()
    assert generate(ours, prompt, 8, temperature=0.0) == expected
    exported = {"mistral": "llama", "mistral-window": "mistral", "gemma3": "gemma3_text"}
    assert export_hf(ours, tokenizer, tmp_path / "back") == exported.get(family, family)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.allclose(logits(back, ids), logits(theirs, ids), atol=1e-4)


def test_sliding_windows_read_as_the_family_says():
    config = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "max_position_embeddings": 4096, "sliding_window": 1024}
    assert read_family(config, "x")[0].sliding_window == 1024
    assert read_family({**config, "sliding_window": 4096}, "x")[0].sliding_window is None
    with pytest.raises(HFError, match="sliding_window: 1024 is narrower than the context"):
        read_family({**config, "model_type": "qwen2", "use_sliding_window": True}, "x/config.json")
    gemma = {**config, "model_type": "gemma3_text", "num_hidden_layers": 6, "head_dim": 4}
    types = read_family(gemma, "x")[0].layer_types  # before layer_types: every 6th is full
    assert types == ("sliding_attention",) * 5 + ("full_attention",)
    with pytest.raises(HFError, match="final_logit_softcapping: soft-capping is not supported"):
        read_family({**gemma, "final_logit_softcapping": 30.0}, "x/config.json")


@pytest.mark.parametrize(("family", "overrides"), CASES)
def test_exported_model_loads_in_transformers_with_equal_logits(transformers, tmp_path, tokenizer,
                                                                family, overrides):
    model = gptflow_model(family, tokenizer, **overrides)
    save_model(tmp_path / "ours", model, tokenizer)
    export_hf(model, tokenizer, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 24))
    assert torch.allclose(logits(theirs, ids), logits(model, ids), atol=1e-4)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS[:3]:
        assert their_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert their_tokenizer.eos_token_id == tokenizer.eot_id


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_adapter_exports_to_peft_where_exact(transformers, tmp_path, tokenizer, family):
    from gptflow.ml.adapter import LoraConfig
    from gptflow.ml.hf import export_peft
    from gptflow.ml.lora import apply_lora

    peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra)")
    model = gptflow_model(family, tokenizer)
    apply_lora(model, ["blocks.0.*q_proj", "*.v_proj", "*.down_proj"], rank=4, alpha=8)
    with torch.no_grad():  # a trained-looking adapter: B away from zero
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    config = LoraConfig("", "", rank=4, alpha=8)
    if family == "gpt2":  # q/k/v are one c_attn there: no exact PEFT form
        assert not export_peft(model, tokenizer, config, tmp_path / "out")
        assert not (tmp_path / "out").exists()
        return
    assert export_peft(model, tokenizer, config, tmp_path / "out")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "base")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
    ids = torch.randint(0, tokenizer.vocab_size, (2, 16))
    assert torch.allclose(logits(theirs, ids), logits(model.eval(), ids), atol=1e-4)


def hub_cache(root: Path, repo: str, folder: Path, commit: str, ref: str = "main") -> None:
    """A model folder placed in a cache laid out as huggingface_hub lays it out."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)


def test_hub_source_offline_from_the_cache(run_pipeline, tmp_path, tokenizer, monkeypatch):
    """hf:ORG/NAME@REVISION, with HF_HUB_OFFLINE=1: served from a cache in
    huggingface_hub's layout, fingerprinted by the commit the revision names."""
    pytest.importorskip("huggingface_hub", reason="huggingface_hub (the hub extra)")
    first, second = "a" * 40, "b" * 40
    for commit, seed in ((first, 0), (second, 1)):
        torch.manual_seed(seed)
        export_hf(gptflow_model("llama", tokenizer), tokenizer, tmp_path / commit)
    cache = tmp_path / "hub"
    hub_cache(cache, "tiny-org/tiny-llama", tmp_path / first, first)
    hub_cache(cache, "tiny-org/tiny-llama", tmp_path / second, second, ref="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipeline = ("name: hub\nnodes:\n  m: {plugin: load-model, "
                "params: {path: 'hf:tiny-org/tiny-llama'}}\n")
    result = run_pipeline(pipeline)
    assert result.code == 0, result.out + result.err
    assert result.record["nodes"]["m"]["metrics"]["family"] == "llama"
    assert run_pipeline(pipeline).record["nodes"]["m"]["status"] == "cached"
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(second)
    from gptflow.session import Session

    (step,) = Session.load(result.pipeline, store=result.store).plan()
    assert step.reason == "data changed: hf:tiny-org/tiny-llama"
    moved = run_pipeline(pipeline)
    assert moved.record["nodes"]["m"]["status"] == "ran"  # main names another commit now
    v2 = run_pipeline(pipeline.replace("tiny-llama'", f"tiny-llama@{second}'"))
    pinned = json.loads((v2.output("m") / "config.json").read_text())
    assert pinned["family"] == "llama" and v2.code == 0
    missing = run_pipeline(pipeline.replace("tiny-llama", "no-such-model"), verb="validate")
    assert missing.code == 2 and "not in the local Hugging Face cache" in missing.err
    bad = run_pipeline(pipeline.replace("hf:tiny-org/tiny-llama", "hf:nonsense"),
                       verb="validate")
    assert bad.code == 2 and "a Hub id is hf:ORG/NAME" in bad.err


def test_generate_takes_a_hub_id(tmp_path, tokenizer, monkeypatch, capfd):
    pytest.importorskip("huggingface_hub", reason="huggingface_hub (the hub extra)")
    from gptflow.cli import main

    export_hf(gptflow_model("llama", tokenizer), tokenizer, tmp_path / "m")
    hub_cache(tmp_path / "hub", "tiny-org/tiny", tmp_path / "m", "c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "hf:tiny-org/tiny", "--prompt", "hello", "--max-new-tokens",
                 "3", "--temperature", "0"]) == 0
    assert capfd.readouterr().out.startswith("hello")
    assert main(["generate", "hf:tiny-org/absent", "--prompt", "x"]) == 2
    assert "not in the local Hugging Face cache" in capfd.readouterr().err
