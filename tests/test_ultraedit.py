"""UltraEdit: the algebra against numpy, the shared lifelong normaliser, what the hooks capture, the
saved state; and, on the default model, whether a single edit lands (docs/ultraedit.md)."""
import io

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.loop import method_config, run
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.ultraedit import EPS, ridge_solve, running_std, running_update, standardise
from wise_bench.metrics import encode_pair

UP = ["model.layers[2].mlp.up_proj", "model.layers[3].mlp.up_proj"]  # both 64 -> 128 on tiny_random
DOWN = "model.layers[3].mlp.down_proj"  # 128 -> 64
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", subject="Atlantis", loc_prompt="q", loc_answer="a", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", subject="the Moon Rose", loc_prompt="q",
            loc_answer="a", index=1),
    Request(prompt="Who founded Apple?", target_new="Zed", subject="Apple", loc_prompt="q", loc_answer="a", index=2),
]


def make(tiny, layers=UP, **overrides):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(METHODS["ultraedit"].Config),
                          {"name": "ultraedit", "layers": layers, "lr": 1.0, **overrides})
    return METHODS["ultraedit"](cfg, model, EditContext(tok, [], torch.device("cpu"), 0))


def target_tokens(tok, requests) -> int:
    return sum(len(encode_pair(tok, r.prompt, r.target_new).target_pos) for r in requests)


def test_ridge_solve_is_the_augmented_least_squares_solution():
    rng = np.random.default_rng(0)
    K, V = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    for lam in (0.1, 1.0, 30.0):
        # min ‖KΔ − V‖² + λ‖Δ‖² is the plain least squares of [K; √λ I] Δ = [V; 0].
        expected = np.linalg.lstsq(np.vstack([K, np.sqrt(lam) * np.eye(3)]), np.vstack([V, np.zeros((3, 2))]), rcond=None)[0]
        got = ridge_solve(torch.tensor(K), torch.tensor(V), lam)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_running_normaliser_over_chunks_matches_numpy_on_the_concatenated_rows():
    rng = np.random.default_rng(1)
    chunks = [rng.normal(loc=3.0, scale=2.0, size=(n, 4)) for n in (4, 7, 1, 5)]
    count, mean, m2 = 0, torch.zeros(4), torch.zeros(4)
    for chunk in chunks:
        count, mean, m2 = running_update(count, mean, m2, torch.tensor(chunk, dtype=torch.float32))
    rows = np.concatenate(chunks)
    # The reference adds n_b × the unbiased chunk variance where the exact update adds (n_b − 1) × it:
    # M2 = the exact sum of squared deviations + Σ unbiased chunk variances (0 for the one-row chunk).
    exact_m2 = ((rows - rows.mean(0)) ** 2).sum(0)
    extra = sum(np.var(c, axis=0, ddof=1) if len(c) > 1 else np.zeros(4) for c in chunks)
    assert count == len(rows)
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(m2.numpy(), exact_m2 + extra, rtol=1e-5)
    np.testing.assert_allclose(running_std(count, m2).numpy(), np.sqrt((exact_m2 + extra) / (len(rows) - 1)), rtol=1e-5)
    np.testing.assert_allclose(standardise(torch.tensor(rows[:2], dtype=torch.float32), mean, running_std(count, m2)).numpy(),
                               (rows[:2] - rows.mean(0)) / (np.sqrt((exact_m2 + extra) / (len(rows) - 1)) + EPS), rtol=1e-4)


def test_a_one_token_turn_keeps_the_statistics_and_the_edit_finite(tiny):
    _, tok = tiny
    one_token = Request(prompt="The capital of Atlantis is", target_new="Z", subject="Atlantis", loc_prompt="q",
                        loc_answer="a", index=0)
    assert target_tokens(tok, [one_token]) == 1
    method = make(tiny)
    try:
        method.edit([one_token])
        (normaliser,) = method.normalisers.values()
        # One row per module, each a chunk of its own: an unbiased variance would be NaN here.
        assert normaliser.count == 2
        assert torch.isfinite(normaliser.mean).all() and torch.isfinite(normaliser.m2).all()
        assert all(torch.isfinite(w).all() for w in method.weights)
        assert all(not torch.equal(w, w0) for w, w0 in zip(method.weights, method.original_weights))
    finally:
        method.restore()


def test_modules_of_one_shape_share_a_normaliser(tiny):
    _, tok = tiny
    method = make(tiny, layers=[*UP, DOWN])
    try:
        keys, grads, _ = method.capture(REQS)  # the weights as the edit will see them
        method.edit(REQS)
        n = target_tokens(tok, REQS)
        assert {k: v.count for k, v in method.normalisers.items()} == {"64x128": 2 * n, "128x64": n}
        shared = torch.cat([torch.cat([keys[i], grads[i]], dim=1) for i in (0, 1)])
        torch.testing.assert_close(method.normalisers["64x128"].mean, shared.mean(0))
        torch.testing.assert_close(method.normalisers["128x64"].mean, torch.cat([keys[2], grads[2]], dim=1).mean(0))
    finally:
        method.restore()


def test_capture_reads_inputs_and_output_gradients_where_targets_are_predicted(tiny):
    model, tok = tiny
    method = make(tiny, layers=[UP[0]])
    module = method.modules[0]
    keys, grads, loss = method.capture(REQS[:2])  # different lengths: the batch is left-padded
    expected_keys, expected_grads, nll = [], [], []
    for r in REQS[:2]:
        enc = encode_pair(tok, r.prompt, r.target_new)
        predicting = [p - 1 for p in enc.target_pos]
        seen = {}

        def hook(_m, args, output):
            seen["input"] = args[0]
            output.requires_grad_(True)
            output.retain_grad()
            seen["output"] = output
            return output

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logp = torch.log_softmax(model(torch.tensor([enc.ids])).logits[0].float(), -1)
                nll_r = -logp[predicting, [enc.ids[p] for p in enc.target_pos]]
                nll_r.sum().backward()
        finally:
            handle.remove()
        expected_keys.append(seen["input"][0, predicting].detach())
        expected_grads.append(seen["output"].grad[0, predicting])
        nll.append(nll_r.detach())
    nll = torch.cat(nll)
    torch.testing.assert_close(keys[0], torch.cat(expected_keys), rtol=1e-4, atol=1e-5)
    # The loss is the mean over every target token of the micro-batch.
    torch.testing.assert_close(grads[0], torch.cat(expected_grads) / len(nll), rtol=1e-4, atol=1e-7)
    assert loss == pytest.approx(nll.mean().item(), rel=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_state_round_trips_and_restore_resets_the_normaliser(tiny):
    method = make(tiny, micro_batch=2)
    try:
        method.edit(REQS[:2])
        buffer = io.BytesIO()
        torch.save(method.state_dict(), buffer)  # what a checkpoint holds, read back as the loop reads it
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        method.edit(REQS[2:])
        (normaliser,) = method.normalisers.values()
        assert normaliser.count > state["normalisers"]["64x128"]["count"]
        method.restore()
        assert normaliser.count == 0 and not normaliser.mean.any() and not normaliser.m2.any()
        assert all(torch.equal(w, w0) for w, w0 in zip(method.weights, method.original_weights))
        method.load_state_dict(state)
        assert all(torch.equal(w, s) for w, s in zip(method.weights, state["weights"]))
        saved = state["normalisers"]["64x128"]
        assert normaliser.count == saved["count"]
        assert torch.equal(normaliser.mean, saved["mean"]) and torch.equal(normaliser.m2, saved["m2"])
    finally:
        method.restore()


@pytest.mark.parametrize("override, message", [
    ("method.lr=0", "method.lr must be > 0"),
    ("method.ridge=-1", "method.ridge must be > 0"),
    ("method.micro_batch=0", "method.micro_batch must be >= 1"),
    ("method.layers=[model.layers.1.mlp]", "not a linear layer|expected a linear layer"),
    ("method.layers=[]", "needs at least one"),
])
def test_bad_settings_are_user_errors(tiny, compose, override, message):
    model, tok = tiny
    cls, cfg = method_config(compose(["method=ultraedit", override]))
    with pytest.raises(UserError, match=message):
        cls(cfg, model, EditContext(tok, [], torch.device("cpu"), 0))


# Measured on models/small with the hyperparameters chosen on zsre_tune for turns of 100 (docs/ultraedit.md):
# on one request the normaliser sees only that request's few rows, and a single edit reaches Rel .283
# on these three requests (zsre_tune, 20 single edits: best Rel .81 over the layers and η tried).
@pytest.mark.integration
@pytest.mark.xfail(strict=True, reason="single edits reach Rel .28 on models/small (docs/ultraedit.md)")
def test_a_single_edit_lands_on_the_default_model(compose, shared_data, tmp_path):
    results = run(compose(["model=small", "method=ultraedit", "dataset=zsre", "edit_mode=single", "num_edits=3",
                           "eval_every=3", f"data_dir={shared_data}"]), tmp_path)
    assert results["pre"]["rel"] < 0.5
    assert results["rel"] >= 0.9
    assert results["loc"] >= 0.9
