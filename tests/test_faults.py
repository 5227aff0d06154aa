"""Bad input and numerical faults: texts over the length limit, non-finite edit steps."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, ZSRE, ZSRE_TRAIN, write_json

import wise_bench.limits as limits
import wise_bench.loop as loop
from wise_bench.data import DataError, TooLongError
from wise_bench.errors import UserError
from transformers import GPT2Config

from wise_bench.limits import model_max_length
from wise_bench.loop import run
from wise_bench.methods import METHODS
from wise_bench.methods.ft import FT
from wise_bench.metrics import length_sorted_batches

FAST = ["method.steps=3", "eval.batch_size=4"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the run gets as far as loading model weights."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the weights were loaded before the input was checked")
    monkeypatch.setattr(loop, "load_model", refuse)


# --- length limits ---------------------------------------------------------------------------------


def with_record(data_dir, index, **fields):
    records = json.loads(json.dumps(ZSRE))
    records[index].update(fields)
    write_json(data_dir / "zsre/zsre_mend_edit.json", records)


def test_a_prompt_over_the_model_limit_is_named_before_the_weights_load(compose, data_dir, tmp_path, no_weights):
    # tiny_random has 2048 positions and a byte-level tokenizer: 3000 characters are ~3000 tokens.
    with_record(data_dir, 1, src="Who founded " + "a" * 3000 + "?")
    with pytest.raises(TooLongError) as err:
        run(compose([f"data_dir={data_dir}", "num_edits=4"]), tmp_path)
    message = str(err.value)
    assert "zsre_mend_edit.json, record 1, field 'src'" in message
    assert "over model.max_length=2048" in message
    # BOS + "Who founded a...a?" + " " + "Bill Gates": every byte is a token.
    assert f"is {1 + len('Who founded ') + 3000 + 1 + 1 + len('Bill Gates')} tokens" in message


def test_the_longer_text_of_a_pair_is_blamed_and_max_length_is_configurable(compose, data_dir, tmp_path, no_weights):
    # BOS + loc (45 bytes) + " " + loc_ans (59 after the target's own trailing space): 106 tokens; the
    # other records' texts are at most 69.
    with_record(data_dir, 2, loc_ans="eight " * 10)
    with pytest.raises(TooLongError, match=r"record 2, field 'loc_ans': loc_prompt \+ loc_answer is 10\d tokens, over model.max_length=100"):
        run(compose([f"data_dir={data_dir}", "num_edits=4", "model.max_length=100"]), tmp_path)


def test_a_method_template_counts_towards_the_limit(compose, data_dir, tmp_path, no_weights):
    # Record 0: prompt + target 58 tokens, portability question + answer 69. Under a limit of 65 the
    # prompt fits on its own but not after WISE's generated prefixes; FT has none, so the portability
    # pair is the first text over.
    base = ["num_edits=1", "model.max_length=65", f"data_dir={data_dir}"]
    with pytest.raises(TooLongError, match=r"record 0, field 'src': prompt \+ target_new \+ \d+-token method template"):
        run(compose([*base, "method=wise"]), tmp_path)
    with pytest.raises(TooLongError, match=r"record 0, field 'portability': portability question \+ answer is 69 tokens"):
        run(compose(base), tmp_path)


def test_max_length_past_the_positions_is_refused_for_learned_positions_only(compose, monkeypatch, caplog):
    cfg = compose(["model.max_length=4096"]).model
    assert model_max_length(compose([]).model, 259) == 2048  # tiny_random's max_position_embeddings
    assert model_max_length(cfg, 259) == 4096  # LLaMA: rotary positions extend
    assert "past the model's max_position_embeddings (2048)" in caplog.text
    monkeypatch.setattr(limits, "model_config", lambda *_: GPT2Config(n_positions=1024))
    with pytest.raises(UserError, match=r"model.max_length=4096 is over the model's 1024 learned positions"):
        model_max_length(cfg, 259)
    with pytest.raises(UserError, match=r"model.max_length=0 must be >= 1"):
        model_max_length(compose(["model.max_length=0"]).model, 259)


def test_skip_takes_the_next_record_and_counts_the_skipped_one(compose, data_dir, tmp_path):
    with_record(data_dir, 1, alt="Bill Gates " * 300)
    results = run(compose([f"data_dir={data_dir}", "num_edits=3", "eval_every=3", "data.on_too_long=skip", *FAST]), tmp_path)
    assert results["skipped"]["skipped_too_long"] == 1
    assert results["skipped_too_long"] == [f"{data_dir / 'zsre/zsre_mend_edit.json'}, record 1"]
    # The three requests edited are records 0, 2 and 3 (samples are indexed by position in the run).
    assert len(read_jsonl(tmp_path / "samples.jsonl")) == 3
    with pytest.raises(DataError, match=r"only 3 records fit model.max_length \(1 too long\), but num_edits=4"):
        run(compose([f"data_dir={data_dir}", "num_edits=4", "data.on_too_long=skip"]), tmp_path / "4")


def test_an_irrelevant_text_over_the_limit_is_named(compose, data_dir, tmp_path, no_weights):
    train = json.loads(json.dumps(ZSRE_TRAIN))
    train[1]["loc_ans"] = "x" * 3000
    write_json(data_dir / "zsre/zsre_mend_train-1k.json", train)
    with pytest.raises(TooLongError, match=r"zsre_mend_train-1k.json, record 1, field 'loc': loc \+ loc_ans is 3\d{3} tokens"):
        run(compose([f"data_dir={data_dir}", "num_edits=2", "method=wise"]), tmp_path)


def test_batches_are_cut_by_a_token_budget():
    # Sorted by length: 1 (1 token), 2 (3), 0 (5), 3 (10); the padded width is the longest in a batch.
    assert length_sorted_batches([5, 1, 3, 10], batch_size=3) == [[1, 2, 0], [3]]
    assert length_sorted_batches([5, 1, 3, 10], batch_size=3, max_tokens=9) == [[1, 2], [0], [3]]
    assert length_sorted_batches([5, 1, 3, 10], batch_size=3, max_tokens=15) == [[1, 2, 0], [3]]


def test_a_token_budget_does_not_change_the_scores(compose, data_dir, tmp_path):
    base = [f"data_dir={data_dir}", "num_edits=4", "eval_every=4", *FAST]
    loose = run(compose(base), tmp_path / "a")
    tight = run(compose([*base, "eval.max_batch_tokens=64"]), tmp_path / "b")
    assert read_jsonl(tmp_path / "a/samples.jsonl") == read_jsonl(tmp_path / "b/samples.jsonl")
    assert (loose["rel"], loose["gen"], loose["loc"]) == (tight["rel"], tight["gen"], tight["loc"])


# --- non-finite edit steps -------------------------------------------------------------------------


def test_a_diverging_learning_rate_stops_the_run_cleanly(compose, data_dir, tmp_path):
    # In float16, Adam steps of 1e6 overflow the weights to inf within the first edit.
    cfg = compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=1", "model.dtype=float16", "method.lr=1e6", *FAST])
    results = run(cfg, tmp_path)
    assert results["stopped"] == "non-finite loss at edit 1"
    assert results["num_edits_done"] == 1
    assert "rel" not in results  # nothing was measured after the fault, and nothing is reported as measured
    assert json.loads((tmp_path / "results.json").read_text())["stopped"] == "non-finite loss at edit 1"


class PoisonsThirdEdit(FT):
    """FT that leaves a NaN in its weight at its third edit call (and edits normally otherwise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def edit(self, requests):
        self.calls += 1
        stats = super().edit(requests)
        if self.calls == 3:
            with torch.no_grad():
                self.weight[0, 0] = float("nan")
        return stats


class LeavesThirdUnedited(FT):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def edit(self, requests):
        self.calls += 1
        return {} if self.calls == 3 else super().edit(requests)


def test_stop_keeps_the_points_computed_before_the_fault(compose, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "ft_m", PoisonsThirdEdit)
    results = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=2", *FAST]), tmp_path)
    points = read_jsonl(tmp_path / "metrics.jsonl")
    assert [p["n_edits"] for p in points] == [2]
    assert results["stopped"] == "non-finite edited weights at edit 3"
    assert results["rel"] == points[0]["rel"] and results["loc"] == points[0]["loc"]
    assert [s["index"] for s in read_jsonl(tmp_path / "samples.jsonl")] == [0, 1]


def test_skip_rolls_the_step_back_and_records_the_request(compose, data_dir, tmp_path, monkeypatch):
    base = [f"data_dir={data_dir}", "num_edits=4", "eval_every=4", *FAST]
    monkeypatch.setitem(METHODS, "ft_m", PoisonsThirdEdit)
    skipped = run(compose([*base, "on_nonfinite=skip"]), tmp_path / "skip")
    monkeypatch.setitem(METHODS, "ft_m", LeavesThirdUnedited)
    reference = run(compose(base), tmp_path / "ref")
    assert skipped["skipped_requests"] == [2]
    assert skipped["skipped"] == {"skipped_nonfinite": 1}
    assert "stopped" not in skipped
    # Rolled back to the state before the faulty step: the same model as never editing request 2.
    assert read_jsonl(tmp_path / "skip/samples.jsonl") == read_jsonl(tmp_path / "ref/samples.jsonl")
    assert skipped["rel"] == reference["rel"]


def test_the_command_line_exits_3_on_a_non_finite_step(data_dir, tmp_path):
    env = {**os.environ, "WISE_BENCH_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "wise_bench", "model=tiny_random", "model.dtype=float16", "method.lr=1e6",
                          "num_edits=2", "method.steps=3", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr
    assert "stopped: non-finite loss at edit 1" in res.stdout + res.stderr
    assert json.loads((tmp_path / "run/results.json").read_text())["stopped"] == "non-finite loss at edit 1"
