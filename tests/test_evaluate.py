"""save_edited=true and ``python -m wise_bench.evaluate``: the saved edited model, evaluated again."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_loop import SMALL

from wise_bench.errors import UserError
from wise_bench.evaluate import evaluate_saved
from wise_bench.loop import build, prepare, run
from wise_bench.methods import METHODS

SCORES = ("rel", "gen", "loc", "portability", "avg")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_re_evaluation_gives_the_runs_own_final_numbers(compose, data_dir, tmp_path, monkeypatch, name):
    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))
    cfg = compose([f"data_dir={data_dir}", f"method={name}", "num_edits=4", "eval_every=4", "save_edited=true",
                   "eval.batch_size=4", *SMALL[name]])
    ran = run(cfg, tmp_path / "run")
    again = evaluate_saved(tmp_path / "run", cfg, tmp_path / "again")
    assert {k: again[k] for k in SCORES} == {k: ran[k] for k in SCORES}
    edited = [{k: v for k, v in row.items() if not k.endswith("_at_edit")} for row in read_jsonl(tmp_path / "run/samples.jsonl")]
    assert read_jsonl(tmp_path / "again/samples.jsonl") == edited
    assert again["evaluated_from"] == str(tmp_path / "run") and again["num_edits"] == 4


def test_it_is_the_saved_state_that_is_evaluated(compose, data_dir, tmp_path):
    cfg = compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=4", "save_edited=true", "method.lr=0.05", "method.steps=10"])
    ran = run(cfg, tmp_path / "run")
    assert ran["rel"] > ran["pre"]["rel"]  # the edits landed
    saved = torch.load(tmp_path / "run/edited.pt", weights_only=True)
    again = evaluate_saved(tmp_path / "run", cfg, tmp_path / "again")
    assert again["rel"] == ran["rel"]
    # The same file with the weights it started from: the unedited model's scores.
    _, method = build(cfg, prepare(cfg))
    saved["method"] = method.state_dict()
    torch.save(saved, tmp_path / "run/edited.pt")
    unedited = evaluate_saved(tmp_path / "run", cfg, tmp_path / "unedited")
    assert {k: unedited[k] for k in SCORES} == {k: ran["pre"][k] for k in SCORES}


def test_the_command_line_re_evaluates_under_another_protocol(data_dir, tmp_path):
    env = {**os.environ, "WISE_BENCH_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    made = subprocess.run([sys.executable, "-m", "wise_bench", "model=tiny_random", "num_edits=2", "eval_every=2",
                           "method.steps=3", "save_edited=true", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    res = subprocess.run([sys.executable, "-m", "wise_bench.evaluate", str(run_dir), "eval.protocols=[teacher_forced,generation]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (out,) = (run_dir / "evaluate").iterdir()
    again, ran = json.loads((out / "results.json").read_text()), json.loads((run_dir / "results.json").read_text())
    assert {k: again[k] for k in SCORES} == {k: ran[k] for k in SCORES}
    assert set(again["protocols"]) == {"teacher_forced", "generation"}

    missing = subprocess.run([sys.executable, "-m", "wise_bench.evaluate", str(tmp_path)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert "no .hydra/overrides.yaml" in missing.stderr


def test_missing_or_foreign_state_is_named(compose, data_dir, tmp_path):
    base = [f"data_dir={data_dir}", "num_edits=2", "eval_every=2", "method.steps=2"]
    run(compose(base), tmp_path / "plain")
    with pytest.raises(UserError, match=r"no edited.pt; run with save_edited=true"):
        evaluate_saved(tmp_path / "plain", compose(base), tmp_path / "out")
    run(compose([*base, "save_edited=true"]), tmp_path / "saved")
    with pytest.raises(UserError, match=r"saved by method=ft_m with other settings than this config's method=ft_l"):
        evaluate_saved(tmp_path / "saved", compose([*base, "method=ft_l"]), tmp_path / "out")
    with pytest.raises(UserError, match=r"save_edited applies to the sequential and batch edit modes"):
        run(compose([*base, "save_edited=true", "edit_mode=single"]), tmp_path / "single")
