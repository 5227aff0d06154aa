"""Exact resume and determinism of every registered method, run through the loop.

A run killed right after a checkpoint and resumed must end bit for bit where an uninterrupted run
ends (method state and per-request scores), and two runs with the same seed must agree exactly.
"""
import math

import pytest
import torch
from omegaconf import OmegaConf
from conftest import ZSRE, write_json
from test_loop import SMALL, read_jsonl

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.loop import CHECKPOINT, run
from wise_bench.methods import METHODS

N_EDITS, CHECKPOINT_AT = 6, 3
# Settings that make every method take seconds on tiny_random, plus what each must exercise across
# the checkpoint: WISE shards at 2 and 4 edits and merges at 4 (after the checkpoint at 3, with a
# shard saved and a mask drawn before it); WISE-Retrieve replays stored edits.
FAST = {
    **SMALL,
    "wise": [*SMALL["wise"], "method.save_freq=2", "method.merge_freq=4"],
    "wise_retrieve": [*SMALL["wise_retrieve"], "method.save_freq=2", "method.merge_freq=4", "method.replay=true"],
}
# Methods that draw random numbers (from generators seeded by the run's seed); the others must not
# depend on the seed at all.
RANDOMISED = {"grace", "wise", "wise_retrieve", "defer", "rome", "memit", "alphaedit", "memoir"}


class Killed(Exception):
    pass


def recording(cls: type, kill_at_call: int | None = None) -> type:
    """``cls`` that keeps its instances (to read their final state) and may die in one ``edit`` call."""

    class Recorded(cls):
        instances: list = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = 0
            Recorded.instances.append(self)

        def edit(self, requests):
            self.calls += 1
            if self.calls == kill_at_call:
                raise Killed
            return super().edit(requests)

    return Recorded


def method_run_config(compose, name: str, overrides: list[str]):
    return compose([f"method={name}", *FAST[name], *overrides])


def run_method(monkeypatch, cfg, run_dir, kill_at_call: int | None = None, **changes):
    """(results, final method state) of a run of ``cfg`` with ``changes``; raises Killed if it dies as asked."""
    name = cfg.method.name
    recorded = recording(METHODS[name], kill_at_call)
    monkeypatch.setitem(METHODS, name, recorded)
    try:
        results = run(OmegaConf.merge(cfg, changes), run_dir)
    finally:
        monkeypatch.setitem(METHODS, name, recorded.__base__)  # the next run of this test wraps the real class
    return results, recorded.instances[-1].state_dict()


def differences(a, b, where: str = "state") -> list[str]:
    """Where two nested method states are not bit for bit equal (tensors: dtype, shape and values)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    same = type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))
    return [] if same else [f"{where}: {a!r} vs {b!r}"]


def scores(run_dir) -> tuple[list[dict], list[dict]]:
    """(evaluation points without wall times, per-request scores of the final evaluation)."""
    points = [{k: v for k, v in p.items() if k not in ("elapsed_s", "edit_s")} for p in read_jsonl(run_dir / "metrics.jsonl")]
    return points, read_jsonl(run_dir / "samples.jsonl")


@pytest.fixture
def six_requests(data_dir, tmp_path, monkeypatch):
    """The fixture data with six distinct edits (two more prompts of known subjects, new targets)."""
    more = [{**r, "src": f"Tell me: {r['src']}", "alt": other["alt"]} for r, other in zip(ZSRE[:2], ZSRE[2:])]
    write_json(data_dir / "zsre/zsre_mend_edit.json", ZSRE + more)
    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))  # ROME/MEMIT/AlphaEdit statistics
    return data_dir


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_run_killed_after_a_checkpoint_resumes_bit_for_bit(compose, six_requests, tmp_path, monkeypatch, name):
    cfg = method_run_config(compose, name, [f"data_dir={six_requests}", f"num_edits={N_EDITS}", "eval_every=2",
                                            f"checkpoint_every={CHECKPOINT_AT}", "eval.batch_size=4"])
    full, full_state = run_method(monkeypatch, cfg, tmp_path / "full")
    with pytest.raises(Killed):
        run_method(monkeypatch, cfg, tmp_path / "killed", kill_at_call=CHECKPOINT_AT + 1)
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)["n_edits"] == CHECKPOINT_AT

    resumed, resumed_state = run_method(monkeypatch, cfg, tmp_path / "resumed", resume=str(tmp_path / "killed"))
    assert resumed["resumed_from"]["n_edits"] == CHECKPOINT_AT
    assert differences(resumed_state, full_state) == []
    assert scores(tmp_path / "resumed") == scores(tmp_path / "full")
    metrics = [k for k in ("rel", "gen", "loc", "portability", "avg") if k in full]
    assert {k: resumed[k] for k in metrics} == {k: full[k] for k in metrics}
    assert [p["n_edits"] for p in scores(tmp_path / "full")[0]] == [2, 4, 6]
    if name in ("wise", "wise_retrieve"):  # after the checkpoint: a merge at 4 edits, a shard saved at 6
        assert len(full_state["shards"]) == 1 and (full_state["merged"] is not None or len(full_state["retrieved"]) == 1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_seed_alone_decides_every_number(compose, data_dir, tmp_path, monkeypatch, name):
    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))
    cfg = method_run_config(compose, name, [f"data_dir={data_dir}", "num_edits=3", "eval_every=3", "eval.batch_size=4"])
    assert cfg.seed == 0
    _, first = run_method(monkeypatch, cfg, tmp_path / "a")
    _, again = run_method(monkeypatch, cfg, tmp_path / "b")
    assert first and differences(again, first) == []
    assert scores(tmp_path / "b") == scores(tmp_path / "a")

    _, other_seed = run_method(monkeypatch, cfg, tmp_path / "c", seed=1)
    if name in RANDOMISED:  # the draws follow the run's seed
        assert differences(other_seed, first) != []
    else:  # no draws at all
        assert differences(other_seed, first) == []


def test_a_checkpoint_holding_pickled_objects_is_refused(compose, data_dir, tmp_path):
    # FT-EWC once kept Request objects in its state: loading one would run arbitrary unpickling code.
    request = Request(prompt="Who founded Apple?", target_new="Bill Gates", loc_prompt="capital of france", loc_answer="Paris")
    torch.save({"n_edits": 2, "method": {"memory": [request]}}, tmp_path / CHECKPOINT)
    with pytest.raises(UserError, match=f"{CHECKPOINT} holds objects other than tensors and plain containers"):
        run(compose([f"data_dir={data_dir}", "num_edits=4", "checkpoint_every=2", f"resume={tmp_path}"]), tmp_path / "run")
