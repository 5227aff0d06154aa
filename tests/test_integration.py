"""End-to-end on the real benchmark files (skipped when ../shared/data is absent)."""
import json

import pytest
from test_loop import cli, read_jsonl

pytestmark = pytest.mark.integration


def test_issue_command_on_real_zsre(shared_data, tmp_path):
    res = cli("method=ft_m", "dataset=zsre", "edit_mode=sequential", "num_edits=20", "eval_every=10", "logger=none",
              data_dir=shared_data, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    points = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [p["n_edits"] for p in points] == [10, 20]
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert results["num_edits"] == 20 and results["dataset"] == "zsre" and results["edit_mode"] == "sequential"
    # FT-M moves the edited requests towards their new targets.
    assert results["rel"] > results["pre"]["rel"]
    assert len(read_jsonl(tmp_path / "run/samples.jsonl")) == 20


@pytest.mark.parametrize("dataset, keys", [("hallucination", {"ppl", "ppl_median", "loc"}), ("temporal", {"ood", "loc"})])
def test_other_real_datasets_run(shared_data, tmp_path, dataset, keys):
    res = cli(f"dataset={dataset}", "num_edits=8", "eval_every=8", "method.steps=2", data_dir=shared_data, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    (point,) = read_jsonl(tmp_path / "run/metrics.jsonl")
    samples = read_jsonl(tmp_path / "run/samples.jsonl")
    assert (results["dataset"], results["num_edits"], point["n_edits"], len(samples)) == (dataset, 8, 8, 8)
    # The summary is the final evaluation point, and each score the mean of the requests' own scores.
    assert {k: results[k] for k in keys} == {k: point[k] for k in keys}
    assert results["loc"] == pytest.approx(sum(s["loc"] for s in samples if "loc" in s) / sum("loc" in s for s in samples))
    assert 0.0 <= results["loc"] <= 1.0
