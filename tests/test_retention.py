"""Retention (final score ÷ score right after the request's own edit) and collapse_at."""
import json

import pytest

from wise_bench.loop import run
from wise_bench.metrics import collapse_point, retention

FAST = ["method.steps=3", "eval.batch_size=4"]


def test_retention_is_the_mean_ratio_over_requests_that_landed():
    rows = [
        {"rel": 0.5, "rel_at_edit": 1.0},   # 0.5
        {"rel": 1.0, "rel_at_edit": 0.5},   # 2.0: improved later
        {"rel": 0.0, "rel_at_edit": 0.0},   # never landed: no ratio
        {"rel": 0.25, "rel_at_edit": 1.0},  # 0.25
        {"rel": 1.0},                       # no probe
    ]
    assert retention(rows, "rel") == pytest.approx((0.5 + 2.0 + 0.25) / 3)
    assert retention([{"rel": 1.0, "rel_at_edit": 0.0}], "rel") is None
    assert retention(rows, "gen") is None


def test_collapse_is_the_first_point_below_a_fraction_of_the_first():
    points = [{"n_edits": 10, "avg": 0.8}, {"n_edits": 20, "avg": 0.5}, {"n_edits": 30, "avg": 0.39},
              {"n_edits": 40, "avg": 0.2}]
    assert collapse_point(points, 0.5) == 30  # 0.39 < 0.4; 0.5 is not
    assert collapse_point(points, 0.2) is None  # never below 0.16
    assert collapse_point(points, 0.7) == 20
    assert collapse_point([], 0.5) is None


def test_a_sequential_run_records_each_request_right_after_its_edit(compose, data_dir, tmp_path):
    results = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=2", *FAST]), tmp_path)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all({"rel_at_edit", "gen_at_edit"} <= s.keys() for s in samples)
    # The last request's probe and the final evaluation see the same model.
    assert samples[-1]["rel_at_edit"] == samples[-1]["rel"] and samples[-1]["gen_at_edit"] == samples[-1]["gen"]
    assert results["retention"]["rel"] == retention(samples, "rel")
    points = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert results["collapse_at"] == collapse_point(points, 0.5)

    off = run(compose([f"data_dir={data_dir}", "num_edits=2", "eval.probe_after_edit=false", *FAST]), tmp_path / "off")
    assert "retention" not in off
