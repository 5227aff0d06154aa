import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, ZSRE, write_json

from wise_bench.errors import UserError
from wise_bench.loop import edit_steps, run
from wise_bench.methods import METHODS
from wise_bench.methods.ft import FT

FAST = ["model=tiny_random", "method.steps=3", "eval.batch_size=4"]  # unit tests: the in-process model


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_edit_steps_evaluate_every_n_and_always_at_the_end():
    assert list(edit_steps(10, 3, 4)) == [(0, 3, False), (3, 6, True), (6, 9, True), (9, 10, True)]
    assert list(edit_steps(4, 1, 2)) == [(0, 1, False), (1, 2, True), (2, 3, False), (3, 4, True)]


def test_sequential_run_writes_points_samples_and_summary(compose, data_dir, tmp_path):
    cfg = compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=2", *FAST])
    results = run(cfg, tmp_path)
    points = read_jsonl(tmp_path / "metrics.jsonl")
    assert [p["n_edits"] for p in points] == [2, 4]
    for p in points:
        assert {"rel", "gen", "loc", "portability", "avg", "elapsed_s", "edit_s"} <= p.keys()
        assert (p["scope"], p["scorer"], p["edit_mode"], p["batch_size"]) == ("all_seen", "teacher_forced_token_acc", "sequential", 1)
        assert p["scorers"]["loc"] == "argmax_agreement_with_unedited"
        assert p["avg"] == pytest.approx((p["rel"] + p["gen"] + p["loc"]) / 3)
    assert 0 < points[0]["edit_s"] < points[1]["edit_s"] <= points[1]["elapsed_s"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert (on_disk["method"], on_disk["model"], on_disk["dataset"], on_disk["num_edits"], on_disk["seed"]) == ("ft_m", "tiny_random", "zsre", 4, 0)
    assert on_disk["rel"] == points[-1]["rel"] and on_disk["pre"]["loc"] == 1.0
    assert set(on_disk["timing"]) == {"edit_s_total", "edit_s_per_edit", "eval_s_total"}
    samples = read_jsonl(tmp_path / "samples.jsonl")
    assert [s["index"] for s in samples] == [0, 1, 2, 3]
    assert (samples[0]["n_edits"], samples[0]["scope"], samples[0]["scorer"]) == (4, "all_seen", "teacher_forced_token_acc")
    assert sum(s["rel"] for s in samples) / 4 == pytest.approx(on_disk["rel"])


def test_single_and_batch_modes(compose, data_dir, tmp_path):
    single = run(compose([f"data_dir={data_dir}", "num_edits=3", "eval_every=2", "edit_mode=single", *FAST]), tmp_path / "s")
    assert (single["scope"], single["edit_mode"]) == ("each_after_own_edit", "single")
    assert [p["n_edits"] for p in read_jsonl(tmp_path / "s/metrics.jsonl")] == [2, 3]
    batch = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=1", "edit_mode=batch", "edit_mode.batch_size=3", *FAST]), tmp_path / "b")
    assert (batch["scope"], batch["batch_size"]) == ("all_seen", 3)
    assert [p["n_edits"] for p in read_jsonl(tmp_path / "b/metrics.jsonl")] == [3, 4]


class ExplodesOnThirdEdit(FT):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def edit(self, requests):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return super().edit(requests)


def test_points_already_computed_survive_a_crash(compose, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "ft_m", ExplodesOnThirdEdit)
    with pytest.raises(RuntimeError, match="boom"):
        run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=2", *FAST]), tmp_path)
    assert [p["n_edits"] for p in read_jsonl(tmp_path / "metrics.jsonl")] == [2]


def test_method_config_is_validated_against_its_dataclass(compose, data_dir, tmp_path):
    with pytest.raises(UserError, match=r"method=ft_m: .*could not be converted to Float"):
        run(compose([f"data_dir={data_dir}", "method.lr=fast"]), tmp_path)
    with pytest.raises(UserError, match=r"Key 'lrr' not in 'FTConfig'"):
        run(compose([f"data_dir={data_dir}", "+method.lrr=1"]), tmp_path)


def test_wandb_offline_files_land_in_the_run_dir(compose, data_dir, tmp_path):
    run(compose([f"data_dir={data_dir}", "num_edits=2", "eval_every=1", "logger=wandb", *FAST]), tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_failure_never_stops_the_run(compose, data_dir, tmp_path, caplog):
    results = run(compose([f"data_dir={data_dir}", "num_edits=2", "eval_every=1", "logger=wandb", "logger.mode=bogus", *FAST]), tmp_path)
    assert "rel" in results and (tmp_path / "results.json").exists()
    assert "W&B init failed" in caplog.text


# --- the command line, as a user runs it ---------------------------------------------------------


def cli(*args: str, data_dir: Path | str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WISE_BENCH_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "wise_bench", *args, f"hydra.run.dir={cwd / 'run'}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_run_and_user_errors(data_dir, tmp_path):
    ok = cli("method=ft_m", "dataset=zsre", "edit_mode=sequential", "num_edits=4", "eval_every=2", "logger=none",
             "method.steps=2", "model=tiny_random", data_dir=data_dir, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert [p["n_edits"] for p in read_jsonl(tmp_path / "run/metrics.jsonl")] == [2, 4]
    assert "wise-bench: ft_m on tiny_random / zsre" in ok.stdout

    # A broken record is reported by file, record and field before any model loads: the model
    # given here does not exist, and it is the data error that is reported.
    bad = json.loads(json.dumps(ZSRE))
    bad[1]["alt"] = ""
    write_json(data_dir / "zsre/zsre_mend_edit.json", bad)
    err = cli("model=gpt2", "model.name_or_path=/nonexistent/model", "num_edits=4", data_dir=data_dir, cwd=tmp_path)
    out = err.stdout + err.stderr
    assert err.returncode == 2
    assert "zsre_mend_edit.json, record 1, field 'alt': is empty" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["num_edit=3"], "Key 'num_edit' not in 'Config'"),
        (["method=nope"], "Available options in 'method'"),
        (["device=gpu"], "Invalid value 'gpu', expected one of [auto, cpu, cuda]"),
        (["method.steps=many"], "Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_cli_config_typos_fail_with_hydra_messages(tmp_path, args, expected):
    res = cli(*args, data_dir=tmp_path / "nodata", cwd=tmp_path)
    assert res.returncode != 0
    assert expected in res.stdout + res.stderr


class SkipsEveryOther(FT):
    def edit(self, requests):
        return {**super().edit(requests), "skipped_missing_subject": requests[0].index % 2}


def test_skip_counts_reported_by_methods_are_totalled(compose, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "ft_m", SkipsEveryOther)
    results = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=4", *FAST]), tmp_path)
    assert results["skipped"] == {"skipped_missing_subject": 2}


LOCATE = ["method.context_templates=1", "method.context_template_length=3", "method.v_steps=2"]
SMALL = {
    "ft_l": ["method.steps=2"], "ft_m": ["method.steps=2"], "ft_ewc": ["method.steps=2"],
    "grace": ["method.n_iter=2"], "defer": ["method.steps=2"],
    "wise": ["method.n_iter=2", "method.context_templates=1", "method.template_lengths=[3]"],
    "wise_retrieve": ["method.n_iter=2", "method.context_templates=1", "method.template_lengths=[3]"],
    "rome": LOCATE, "memit": LOCATE, "alphaedit": LOCATE,
    "memoir": ["method.n_iter=2", "method.context_templates=1", "method.template_lengths=[3]"],
    "ultraedit": ["method.lr=1e-2"],
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_through_the_loop_leaves_the_model_unedited_in_single_mode(compose, data_dir, tmp_path, monkeypatch, name):
    """edit_mode=single restores after every request: the model ends exactly as loaded, same modules."""
    import wise_bench.loop as loop

    loaded = []
    real_load = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))
    cfg = compose([f"data_dir={data_dir}", f"method={name}", "edit_mode=single", "num_edits=2", "eval_every=2",
                   "eval.batch_size=4", *SMALL[name]])
    results = run(cfg, tmp_path)
    assert results["method"] == name and results["scope"] == "each_after_own_edit"
    (model,) = loaded
    fresh = real_load(cfg.model, model.config.vocab_size, model.device)
    assert [type(m) for m in model.modules()] == [type(m) for m in fresh.modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
