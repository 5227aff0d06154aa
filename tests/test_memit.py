"""MEMIT on the tiny random model (see test_rome.py for why Rel is not the criterion there)."""
import json

import torch
from omegaconf import OmegaConf

from wise_bench.data import Request
from wise_bench.loop import run
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.memit import block_path, memit_update
from wise_bench.methods.rome import locate

LAYERS = ["model.layers[0].mlp.down_proj", "model.layers[1].mlp.down_proj"]
CORPUS = [f"nq question: who wrote book number {i} about {w}" for i, w in enumerate(["rivers", "kings", "stars", "cats", "maps"])]
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", subject="Atlantis", loc_prompt="nq question: sky", loc_answer="blue", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", subject="the Moon Rose", loc_prompt="nq question: sea", loc_answer="salty", index=1),
    Request(prompt="Who founded Apple?", target_new="Zed", subject="Microsoft", loc_prompt="q", loc_answer="a", index=2),
]
SMALL = dict(context_templates=1, context_template_length=3, v_steps=5, mom2_dataset="train_texts")
FAST_CLI = ["method.context_templates=1", "method.context_template_length=3", "method.v_steps=3", "eval.batch_size=4"]


def make(tiny, tmp_path, name="memit", **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS[name].Config),
                          {"name": name, "layers": LAYERS, "stats_dir": str(tmp_path), **SMALL, **overrides})
    return METHODS[name](cfg, model, EditContext(tok, CORPUS, torch.device("cpu"), 0))


def read_points(run_dir):
    """The evaluation points a run wrote to metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_update_solves_the_regularised_least_squares():
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(6, 3, generator=g), torch.randn(4, 3, generator=g)
    A = torch.randn(6, 6, generator=g)
    C = A @ A.T / 6 + torch.eye(6)
    for lam in (0.5, 100.0):
        dW = memit_update(R, K, C, lam)
        torch.testing.assert_close(dW @ (lam * C.double() + K.double() @ K.double().T), R.double() @ K.double().T)
    # Negligible λ: every key is mapped exactly onto its residual; large λ: the update shrinks.
    torch.testing.assert_close(memit_update(R, K, C, 1e-8) @ K.double(), R.double(), rtol=1e-6, atol=1e-6)
    assert memit_update(R, K, C, 1e4).norm() < 1e-2 * memit_update(R, K, C, 1.0).norm()


def test_block_path():
    assert block_path("model.layers[8].mlp.down_proj") == "model.layers.8"
    assert block_path("transformer.h.17.mlp.c_proj") == "transformer.h.17"


def test_batch_edit_reaches_target_hidden_states_and_restore_is_exact(tiny, tmp_path):
    model, _ = tiny
    before = snapshot(model)
    # Tiny λ: the least-squares solve is then exact at the keys, so the hidden states after the last
    # edited layer must land on z* = z + δ for every request of the batch.
    method = make(tiny, tmp_path, mom2_update_weight=1e-6)
    located, _ = locate(REQS, "skip")
    z_star, _ = method.target_hidden(located)
    (z_before,) = method.subject_vectors(located, [(method.block, "output")])
    try:
        stats = method.edit(REQS)
        assert stats["skipped_missing_subject"] == 1  # REQS[2]: "Microsoft" is not in its prompt
        (z_after,) = method.subject_vectors(located, [(method.block, "output")])
        assert (z_star - z_before).norm() > 0.01
        torch.testing.assert_close(z_after, z_star, rtol=1e-3, atol=1e-3)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    finally:
        method.restore()
    assert_same(model, before)


def test_sequential_steps_persist_and_state_round_trips(tiny, tmp_path):
    model, _ = tiny
    before = snapshot(model)
    method = make(tiny, tmp_path)
    try:
        method.edit(REQS[:1])
        first = [w.detach().clone() for w in method.weights]
        method.edit(REQS[1:2])
        assert all(not torch.equal(w, f) for w, f in zip(method.weights, first))
        state = method.state_dict()
        method.restore()
        assert_same(model, before)
        method.load_state_dict(state)
        assert all(torch.equal(w, s) for w, s in zip(method.weights, state["weights"]))
    finally:
        method.restore()
    assert_same(model, before)


def test_only_missing_subjects_edit_nothing(tiny, tmp_path):
    model, _ = tiny
    before = snapshot(model)
    assert make(tiny, tmp_path).edit(REQS[2:]) == {"skipped_missing_subject": 1}
    assert_same(model, before)


def test_memit_mass_runs_in_the_loop(compose, data_dir, tmp_path):
    cfg = compose([f"data_dir={data_dir}", "method=memit", "edit_mode=batch", "edit_mode.batch_size=4", "num_edits=4",
                   "eval_every=4", f"method.stats_dir={tmp_path / 'stats'}", *FAST_CLI])
    assert cfg.method.layers == LAYERS and cfg.method.mom2_dataset.endswith("zsre/zsre_mend_train-1k.json")
    results = run(cfg, tmp_path)
    assert (results["edit_mode"], results["batch_size"], results["num_edits"], results["method"]) == ("batch", 4, 4, "memit")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    (point,) = read_points(tmp_path)
    assert (point["n_edits"], point["batch_size"], point["rel"]) == (4, 4, results["rel"])
    # The cached second moments: one per edited layer, of the run's corpus.
    cached = [torch.load(p)["key"] for p in (tmp_path / "stats").rglob("*.pt")]
    assert sorted(k["layer"] for k in cached) == LAYERS and {k["corpus"] for k in cached} == {cfg.method.mom2_dataset}
