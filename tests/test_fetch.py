"""Data by name (``ni:``, ``data:``): fetched from a server on 127.0.0.1 standing in
for upstream, checked, kept in the cache by content, found offline, and one clear
line when it cannot be had."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from gptflow import fetch
from gptflow.fetch import NI_COMMIT, FetchError

TASK = "task9_toy_sentiment"
COMMIT = "c0ffee"


def ni_task(instances: int, **extra: object) -> dict[str, object]:
    return {"Definition": ["Say whether the review is Positive or Negative."],
            "Positive Examples": [{"input": "great", "output": "Positive"}],
            "Instances": [{"id": f"t-{i}", "input": f"review {i}",
                           "output": ["Positive" if i % 2 else "Negative"]}
                          for i in range(instances)], **extra}


@pytest.fixture
def upstream(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 laid out as upstream is; ``root`` is its folder.
    Requests are counted in ``hits``."""
    root = tmp_path / "upstream"
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTFLOW_DATA_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.delenv("GPTFLOW_OFFLINE", raising=False)
    monkeypatch.delenv("GPTFLOW_DATA", raising=False)
    monkeypatch.setattr(fetch, "_FAILED", {})
    yield type("Upstream", (), {"root": root, "hits": hits, "server": server})
    server.shutdown()
    server.server_close()


def publish(upstream, commit: str, task: dict[str, object]) -> None:
    path = upstream.root / "allenai/natural-instructions" / commit / "tasks" / f"{TASK}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(task, indent=4))


def test_a_task_is_downloaded_once_then_read_offline_from_the_cache(upstream, monkeypatch):
    publish(upstream, COMMIT, ni_task(10))
    first = fetch.fetch(f"ni:{TASK}@{COMMIT}?n=4")
    assert first.name == f"{TASK}.json"  # the task keeps its name
    assert [i["id"] for i in json.loads(first.read_text())["Instances"]] == \
        ["t-0", "t-1", "t-2", "t-3"]
    assert first.parent.name == hashlib.sha256(first.read_bytes()).hexdigest()
    assert len(upstream.hits) == 1

    monkeypatch.setenv("GPTFLOW_OFFLINE", "1")  # and the server gone
    upstream.server.shutdown()
    assert fetch.fetch(f"ni:{TASK}@{COMMIT}?n=4") == first
    assert len(fetch.fetch(f"ni:{TASK}@{COMMIT}").read_text()) > len(first.read_text())
    with pytest.raises(FetchError, match="GPTFLOW_OFFLINE is set"):
        fetch.fetch(f"ni:{TASK}@other?n=4")  # another commit is another file


def test_the_same_instances_have_the_same_bytes_wherever_they_came_from(upstream, tmp_path,
                                                                          monkeypatch):
    """A by-hand copy in $GPTFLOW_DATA with more instances and a note of its own is
    the same data as the download: content-addressed, one fingerprint."""
    publish(upstream, NI_COMMIT, ni_task(6))
    downloaded = fetch.fetch(f"ni:{TASK}?n=6")
    local = tmp_path / "data" / "natural-instructions-large" / f"{TASK}.json"
    local.parent.mkdir(parents=True)
    local.write_text(json.dumps(ni_task(50, _subset_note="the first 50"), indent=2))
    monkeypatch.setenv("GPTFLOW_DATA", str(tmp_path / "data"))
    assert fetch.fetch(f"ni:{TASK}?n=6").read_bytes() == downloaded.read_bytes()
    assert fetch.digest(f"ni:{TASK}?n=6") == downloaded.parent.name
    assert len(json.loads(fetch.fetch(f"ni:{TASK}").read_text())["Instances"]) == 50
    with pytest.raises(FetchError, match="holds 50 instances, fewer than"):
        fetch.fetch(f"ni:{TASK}?n=51")


def test_a_pinned_checksum_refuses_other_bytes(upstream, monkeypatch):
    text = b"To be, or not to be\n" * 100
    path = upstream.root / "someone/texts/main/play.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"To be, or not to be?\n" * 100)  # not what was pinned
    monkeypatch.setitem(fetch.TEXTS, "play", fetch.Text(
        "someone/texts/main/play.txt", "play/play.txt", hashlib.sha256(text).hexdigest()))
    with pytest.raises(FetchError, match="not the pinned"):
        fetch.fetch("data:play")
    assert not list((fetch.cache_dir() / "data").glob("*/play.txt"))  # nothing kept
    path.write_bytes(text)
    assert fetch.fetch("data:play").read_bytes() == text


def test_what_is_not_a_task_file_is_refused_and_not_kept(upstream):
    path = upstream.root / "allenai/natural-instructions" / COMMIT / "tasks" / f"{TASK}.json"
    path.parent.mkdir(parents=True)
    path.write_text("<html>rate limited</html>")
    with pytest.raises(FetchError, match="is not a JSON task file"):
        fetch.fetch(f"ni:{TASK}@{COMMIT}")
    path.write_text(json.dumps({"Instances": []}))
    with pytest.raises(FetchError, match="no Definition and Instances lists"):
        fetch.fetch(f"ni:{TASK}@{COMMIT}")
    assert not (fetch.cache_dir() / "data" / "refs").exists()


def test_a_download_is_bounded(upstream, monkeypatch):
    publish(upstream, COMMIT, ni_task(200))
    monkeypatch.setattr(fetch, "MAX_BYTES", 1000)
    with pytest.raises(FetchError, match="over 1,000 bytes; refused"):
        fetch.fetch(f"ni:{TASK}@{COMMIT}")


def test_without_network_or_cache_one_line_says_how_to_provide_it(upstream):
    upstream.server.shutdown()
    upstream.server.server_close()
    with pytest.raises(FetchError) as e:
        fetch.fetch(f"ni:{TASK}?n=3")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"ni:{TASK}?n=3: download from http://")
    assert message.endswith(f"put the file at $GPTFLOW_DATA/natural-instructions/{TASK}.json")


@pytest.mark.parametrize(("value", "expected"), [
    ("ni:../../etc/passwd", "a task is ni:taskNNN_name"),
    ("ni:task1_x@main/..", "is not a commit, branch or tag"),
    ("ni:task1_x?n=0", "positive whole number"),
    ("ni:task1_x?first=3", "takes one option"),
    ("data:tinyshakespear", "unknown data source 'data:tinyshakespear'"),
])
def test_malformed_names_are_refused_before_any_download(upstream, value, expected):
    with pytest.raises(FetchError, match=expected):
        fetch.fetch(value)
    assert not upstream.hits


def test_a_pipeline_names_data_by_name_and_validates_with_one_line_per_problem(
        upstream, run_pipeline):
    publish(upstream, COMMIT, ni_task(8))
    node = "  {0}: {{plugin: read, params: {{path: '{1}'}}}}\n"
    good = "name: d\nnodes:\n" + node.format("a", f"ni:{TASK}@{COMMIT}?n=8")
    bad = good + node.format("b", f"ni:{TASK}@{COMMIT}?n=9") + node.format("c", "data:nope")
    result = run_pipeline(bad, verb="validate")
    assert result.code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 2, result.err
    assert "fewer than ?n=9" in lines[0] and "unknown data source 'data:nope'" in lines[1]
    ran = run_pipeline(good)
    assert ran.code == 0, ran.err
    text = Path(ran.record["nodes"]["a"]["outputs"]["data"], "text.txt").read_text()
    assert json.loads(text)["Instances"][7]["id"] == "t-7"
    upstream.server.shutdown()  # offline now: the cache holds it, and so does the store
    assert "cached" in run_pipeline(good).out
