"""Uses gptflow's pytest fixtures (`run_pipeline`), as any plugin author can."""

import json


def test_word_count_node(run_pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("the cat and the hat")
    notify = tmp_path / "notify.log"
    monkeypatch.setenv("WORDCOUNT_NOTIFY", str(notify))
    pipeline = {"name": "wc", "nodes": {"count": {"plugin": "word-count",
                                                  "params": {"files": ["*.txt"], "top": 2}}}}
    result = run_pipeline(pipeline)
    assert result.code == 0, result.err + result.out
    report = json.loads((result.output("count") / "report.json").read_text())
    assert report["rows"][0] == {"model": "count", "task": "wordcount", "metric": "the", "value": 2}
    assert result.record["nodes"]["count"]["metrics"]["words"] == 5
    assert notify.read_text().endswith("count ran\n")
    assert run_pipeline(pipeline).record["nodes"]["count"]["status"] == "cached"
    (tmp_path / "a.txt").write_text("changed")
    assert run_pipeline(pipeline).record["nodes"]["count"]["status"] == "ran"


def test_bad_param_is_reported(run_pipeline):
    result = run_pipeline({"name": "wc", "nodes": {"count": {"plugin": "word-count",
                                                             "params": {"topp": 2}}}})
    assert result.code == 2
    assert "unknown param 'topp'; did you mean 'top'?" in result.err
