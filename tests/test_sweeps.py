"""Hydra multirun as users run it: basic, joblib and submitit_local launchers, Optuna sweeper."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from wise_bench.loop import run_names


def multirun(tmp_path, data_dir, *args):
    env = {**os.environ, "WISE_BENCH_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "wise_bench", "-m", *args, "eval_every=2", "method.steps=2", "model=tiny_random",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return sorted((tmp_path / "sweep").glob("*/results.json")), res


def test_run_names_for_trackers(compose):
    cfg = compose(["num_edits=4"])
    assert run_names(cfg) == ("ft_m-zsre-tiny_random-T4", "zsre-tiny_random")


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_multirun_one_run_per_combination(tmp_path, data_dir, launcher):
    results, _ = multirun(tmp_path, data_dir, "method=ft_m,ft_l", "num_edits=2,4", f"hydra/launcher={launcher}",
                          *(["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []))
    runs = {(r["method"], r["num_edits"]) for r in map(lambda p: json.loads(p.read_text()), results)}
    assert runs == {("ft_m", 2), ("ft_m", 4), ("ft_l", 2), ("ft_l", 4)}
    assert {p.parent.name for p in results} == {"0_ft_m_zsre_T2", "1_ft_m_zsre_T4", "2_ft_l_zsre_T2", "3_ft_l_zsre_T4"}


def test_submitit_local_launcher(tmp_path, data_dir):
    results, _ = multirun(tmp_path, data_dir, "num_edits=2", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    (path,) = results
    summary = json.loads(path.read_text())
    points = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    assert (summary["method"], summary["num_edits"]) == ("ft_m", 2) and [p["n_edits"] for p in points] == [2]
    assert summary["rel"] == points[0]["rel"]


def test_optuna_sweeper_maximises_the_returned_objective(tmp_path, data_dir):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    results, res = multirun(tmp_path, data_dir, "+hparams_search=ft_optuna", "dataset=zsre", "num_edits=2", "hydra.sweeper.n_trials=2")
    assert len(results) == 2
    best = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    values = [json.loads(p.read_text())["avg"] for p in results]
    assert f"best_value: {max(values)}" in best


def test_wise_optuna_search_space_names_real_wise_keys(compose):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from wise_bench.loop import method_config

    cfg = compose(["+hparams_search=wise_optuna"], test_model=None)
    typed = method_config(cfg)[1]
    params = OmegaConf.load(REPO / "conf/hparams_search/wise_optuna.yaml").hydra.sweeper.params
    assert cfg.method.name == "wise" and cfg.objective == "avg"
    assert cfg.dataset.name == "zsre_tune"  # searches never see the reported records
    assert all(key.split(".", 1)[1] in typed for key in params)
