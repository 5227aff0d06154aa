"""Protocols and run management: paper chunks, checkpoints and resume, determinism."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, ZSRE, write_json
from omegaconf import OmegaConf
from test_loop import FAST, read_jsonl

from wise_bench.errors import UserError
from wise_bench.loop import run
from wise_bench.methods import METHODS

METRICS = ("rel", "gen", "loc", "portability", "avg")


def metrics_only(points):
    return [{k: p[k] for k in ("n_edits", *METRICS)} for p in points]


def test_paper_chunks_edit_each_chunk_from_the_unedited_model(compose, data_dir, tmp_path):
    res = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=4", "edit_mode=paper_chunks",
                       "edit_mode.chunk_size=2", *FAST]), tmp_path / "chunks")
    chunks = read_jsonl(tmp_path / "chunks/chunks.jsonl")
    assert [(c["chunk"], c["start"], c["stop"]) for c in chunks] == [(0, 0, 2), (1, 2, 4)]
    assert res["rel"] == pytest.approx((chunks[0]["rel"] + chunks[1]["rel"]) / 2)
    assert (res["scope"], res["chunk_size"]) == ("chunk_end", 2)
    # The second chunk scores exactly as a fresh sequential run on its two requests alone.
    alone = tmp_path / "alone"
    write_json(alone / "zsre/zsre_mend_edit.json", ZSRE[2:4])
    write_json(alone / "zsre/zsre_mend_train-1k.json", ZSRE)
    fresh = run(compose([f"data_dir={alone}", "num_edits=2", "eval_every=2", *FAST]), tmp_path / "fresh")
    keys = [k for k in METRICS if k in fresh]  # these two fixture records have no portability question
    assert keys and {k: chunks[1][k] for k in keys} == pytest.approx({k: fresh[k] for k in keys})


def test_paper_chunks_need_whole_chunks(compose, data_dir, tmp_path):
    with pytest.raises(UserError, match="num_edits=3 is not a multiple of edit_mode.chunk_size=2"):
        run(compose([f"data_dir={data_dir}", "num_edits=3", "edit_mode=paper_chunks", "edit_mode.chunk_size=2"]), tmp_path)


def test_resume_refuses_a_different_config(compose, data_dir, tmp_path):
    args = [f"data_dir={data_dir}", "num_edits=4", "eval_every=2", "checkpoint_every=2", *FAST]
    run(compose(args[:-2] + ["num_edits=3", "method.steps=3", "eval.batch_size=4"]), tmp_path / "a")
    with pytest.raises(UserError, match=r"differs from the checkpointed run in: num_edits"):
        run(compose([*args, f"resume={tmp_path / 'a'}"]), tmp_path / "b")


@pytest.mark.integration
def test_sigkill_then_resume_in_the_same_directory(data_dir, tmp_path):
    """A run killed with SIGKILL continues from its last checkpoint and ends as an uninterrupted run."""
    env = {**os.environ, "WISE_BENCH_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    write_json(data_dir / "zsre/zsre_mend_edit.json", ZSRE * 3)  # 12 requests
    args = ["num_edits=12", "eval_every=3", "checkpoint_every=3", "method.steps=25", "model=tiny_random"]

    def start(run_dir, *extra):
        return subprocess.Popen([sys.executable, "-m", "wise_bench", *args, *extra, f"hydra.run.dir={run_dir}"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    killed = start(tmp_path / "killed")
    ckpt = tmp_path / "killed/checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "the run finished before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed/results.json").exists()

    assert start(tmp_path / "killed", f"resume={tmp_path / 'killed'}").wait(timeout=300) == 0
    assert start(tmp_path / "straight").wait(timeout=300) == 0
    resumed = json.loads((tmp_path / "killed/results.json").read_text())
    straight = json.loads((tmp_path / "straight/results.json").read_text())
    assert resumed["resumed_from"]["n_edits"] >= 3
    assert {k: resumed[k] for k in METRICS} == {k: straight[k] for k in METRICS}
    points = metrics_only(read_jsonl(tmp_path / "killed/metrics.jsonl"))
    assert points == metrics_only(read_jsonl(tmp_path / "straight/metrics.jsonl"))
    assert [p["n_edits"] for p in points] == [3, 6, 9, 12]


class RecordsSteps(METHODS["ft_m"]):
    steps: list[list[int]] = []

    def edit(self, requests):
        RecordsSteps.steps.append([r.index for r in requests])
        return super().edit(requests)


def test_paper_chunks_can_batch_a_whole_chunk(compose, data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "ft_m", RecordsSteps)
    RecordsSteps.steps = []
    res = run(compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=4", "edit_mode=paper_chunks",
                       "edit_mode.chunk_size=2", "edit_mode.batch_size=2", *FAST]), tmp_path)
    assert RecordsSteps.steps == [[0, 1], [2, 3]] and res["batch_size"] == 2


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf/experiment").glob("*.yaml")))
def test_experiment_configs_compose(compose, name):
    cfg = compose([f"+experiment={name}", "model=llama-2-7b"])
    experiment = OmegaConf.load(REPO / "conf/experiment" / f"{name}.yaml")
    # The paper's protocols score once, after the whole stream.
    assert (cfg.num_edits, cfg.eval_every, cfg.model.name) == (experiment.num_edits, cfg.num_edits, "llama-2-7b")
    if name == "table2_zsre_memit_mass":
        assert (cfg.method.name, cfg.edit_mode.batch_size, cfg.edit_mode.chunk_size) == ("memit", 100, 100)
