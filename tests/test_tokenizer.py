"""Tokenizers round-trip text losslessly; token shards keep documents apart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptflow.ml.data import TokenShards, write_tokens
from gptflow.ml.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "日本語のテキストも、そのまま往復します。",
    "emoji 🎉🚀 and accents: naïve café, Ærøskøbing",
    "  leading spaces\n\n\ttabs and\r\nwindows newlines  ",
    "code: def f(x):\n    return x ** 2  # comment",
    "<|endoftext|> in a corpus stays text",
]
CORPUS = [t * 3 for t in TEXTS] + [f"document number {i} says hello" for i in range(200)]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(CORPUS, vocab_size=400, min_frequency=1)


def test_bpe_round_trips_any_utf8(bpe):
    for text in [*TEXTS[:-1], "完全に未知の漢字列：龘靐齉", "\x00\x01 control bytes"]:
        assert bpe.decode(bpe.encode(text)) == text


def test_special_tokens_in_a_prompt_are_their_ids(bpe):
    """As transformers encodes them, in the fast path too; decode can keep them."""
    ids = bpe.encode(TEXTS[-1])
    assert ids[0] == bpe.eot_id and ids.count(bpe.eot_id) == 1
    assert ids == bpe.hf.encode(TEXTS[-1], add_special_tokens=False).ids
    assert bpe.decode(ids, skip_special=False) == TEXTS[-1]
    assert bpe.decode(ids) == TEXTS[-1].removeprefix("<|endoftext|>")


def test_fast_path_gives_the_same_ids_as_hugging_face(bpe):
    assert bpe.kind == "bpe"
    fast = bpe.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, fast, strict=True):
        assert ids.tolist() == bpe.hf.encode(text, add_special_tokens=False).ids
    stream = bpe.encode_documents(TEXTS[:-1])
    expected = [i for t in TEXTS[:-1] for i in [*bpe.encode(t), bpe.eot_id]]
    assert stream.tolist() == expected


def test_end_of_text_inside_a_document_is_not_a_boundary(bpe):
    ids = bpe.encode_documents([TEXTS[-1]]).tolist()
    assert ids.count(bpe.eot_id) == 1 and ids[-1] == bpe.eot_id


def test_char_tokenizer(tmp_path):
    tok = Tokenizer.train_char(["hello\nworld 日本"])
    assert tok.kind == "char"
    assert tok.decode(tok.encode("hello 日本\n")) == "hello 日本\n"
    assert tok.encode("hé") == [tok.encode("h")[0], tok.hf.token_to_id("<|unk|>")]
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == "char" and again.encode("world") == tok.encode("world")


def test_load_existing_tokenizer_json(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode(TEXTS[1]) == bpe.encode(TEXTS[1])
    assert loaded.eot_id == bpe.eot_id == 0 and loaded.pad_id == 1


def test_shards_split_by_document_without_overlap(bpe, tmp_path):
    docs = [f"doc {i} " + "word " * (i % 7) for i in range(500)]
    meta = write_tokens(docs, bpe, tmp_path, val_fraction=0.1, shard_tokens=1000, batch_docs=64)
    assert meta["splits"]["val"]["documents"] == pytest.approx(50, abs=2)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 500
    assert len(meta["splits"]["train"]["shards"]) > 1  # rotated at 1000 tokens
    train, val = TokenShards(tmp_path, "train"), TokenShards(tmp_path, "val")
    assert train.tokens == meta["splits"]["train"]["tokens"]

    def documents(shards):
        ids = np.concatenate(shards.arrays).tolist()
        text = bpe.decode(ids)  # specials are dropped: split on the eot ids instead
        out, current = [], []
        for i in ids:
            if i == bpe.eot_id:
                out.append(bpe.decode(current))
                current = []
            else:
                current.append(i)
        return out, text

    train_docs, _ = documents(train)
    val_docs, _ = documents(val)
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert json.loads((tmp_path / "meta.json").read_text())["dtype"] == "uint16"


def test_tail_split_holds_out_the_end(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(10_000))
    tok = Tokenizer.train_char([text])
    meta = write_tokens([text], tok, tmp_path, val_fraction=0.1, split="tail", shard_tokens=3000)
    train, val = TokenShards(tmp_path, "train"), TokenShards(tmp_path, "val")
    assert (train.tokens, val.tokens) == (9001, 1000)  # 10,000 chars + one eot
    stream = np.concatenate(train.arrays + val.arrays)
    assert tok.decode(stream[:10_000]) == text
    assert meta["splits"]["val"]["tokens"] == 1000


def test_one_text_file_tokenizes_with_the_defaults_holding_out_its_tail(run_pipeline,
                                                                        tmp_path):
    """The first thing a new user tries: the documents split would send the only
    document to validation; the node holds out the tail instead and says so."""
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of a play, spoken softly.\n" for i in range(400)))
    result = run_pipeline(f"name: one\nnodes:\n  tok: {{plugin: tokenize, params: "
                          f"{{corpus: ['{text}'], tokenizer: char}}}}\n")
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["tok"]["metrics"]
    assert metrics["split"] == "tail" and metrics["documents"] == 1
    assert metrics["val_tokens"] == pytest.approx(0.05 * (metrics["train_tokens"]
                                                         + metrics["val_tokens"]), abs=1)
    assert "too few to hold whole ones out" in result.out


@pytest.mark.parametrize(("documents", "fraction", "expected"), [
    (1, 0.05, "tail"), (2, 0.05, "documents"), (100, 0.05, "documents"), (1, 0.0, "documents"),
    (5, 0.5, "documents")])
def test_the_documents_split_stays_where_both_sides_get_documents(documents, fraction,
                                                                  expected):
    from gptflow.ml.data import held_out_split

    assert held_out_split(documents, fraction, "documents") == expected
    assert held_out_split(documents, fraction, "tail") == "tail"


def test_tokenize_reads_datasets_from_upstream_nodes(run_pipeline, tmp_path):
    """A third party's cleaning node feeds tokenize through the DAG; a task dataset
    gives its definitions and inputs, never its outputs."""
    from gptflow.ml.tasks import sentiment4, write_dataset

    raw = tmp_path / "raw.txt"
    raw.write_text("".join(f"  review number {i}: a fine film, well worth it  \n\n"
                           for i in range(60)))
    result = run_pipeline(f"""\
name: clean
nodes:
  clean: {{plugin: clean, params: {{path: "{raw}"}}}}
  tok:
    plugin: tokenize
    inputs: {{data: clean}}
    params: {{tokenizer: char}}
""")
    assert result.code == 0, result.out + result.err
    metrics = result.record["nodes"]["tok"]["metrics"]
    assert metrics["documents"] == 60 and metrics["train_tokens"] > 0

    tasks = tmp_path / "tasks"
    task = sentiment4(n=20, test=5)
    write_dataset(tasks, task)
    from gptflow.ml.data import dataset_documents

    docs = list(dataset_documents(tasks))
    assert docs == [task.definition, *(i.input for i in task.instances)]
    assert not any(o in docs for i in task.instances for o in i.outputs)


def test_a_text_file_splits_into_documents_by_paragraph_or_line(run_pipeline, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("first paragraph,\nstill the first\n\n\nsecond\n \nthird\n")
    pipeline = f"""\
name: split
nodes:
  tok: {{plugin: tokenize, params: {{corpus: ["{text}"], tokenizer: char, val_fraction: 0,
                                    split_by: SPLIT}}}}
"""
    for split_by, documents in (("file", 1), ("paragraph", 3), ("line", 4)):
        result = run_pipeline(pipeline.replace("SPLIT", split_by))
        assert result.code == 0, result.out + result.err
        assert result.record["nodes"]["tok"]["metrics"]["documents"] == documents, split_by


def test_a_text_dataset_where_tasks_are_read_names_what_feeds_what(tmp_path):
    from gptflow.ml.tasks import load_dataset_tasks

    (tmp_path / "clean.jsonl").write_text('{"text": "a line"}\n')
    with pytest.raises(ValueError, match="a text dataset feeds tokenize's data input"):
        load_dataset_tasks(tmp_path)


def test_a_dataset_in_a_newer_layout_is_refused_by_name(tmp_path):
    from gptflow.ml.data import dataset_documents

    (tmp_path / "clean.jsonl").write_text('{"text": "a line"}\n')
    (tmp_path / "artifact.json").write_text('{"type": "dataset", "meta": {"layout": 2}}')
    with pytest.raises(ValueError, match="dataset layout 2; this gptflow reads layout 1"):
        list(dataset_documents(tmp_path))
