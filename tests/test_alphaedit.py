"""AlphaEdit: the null-space projection on hand-made keys, and the method on the tiny random model."""
import torch
from test_memit import FAST_CLI, LAYERS, REQS, assert_same, make, read_points, snapshot

from wise_bench.loop import run
from wise_bench.methods.alphaedit import alphaedit_update, null_space_projection


def test_projected_update_leaves_preserved_keys_unchanged():
    g = torch.Generator().manual_seed(0)
    d = 8
    K0 = (torch.randn(d, 3, generator=g) @ torch.randn(3, 50, generator=g)).double()  # preserved keys span 3 dims
    C = K0 @ K0.T / 50
    P = null_space_projection(C, 1e-2)
    torch.testing.assert_close(P @ P, P)
    assert round(P.trace().item()) == d - 3
    K, R = torch.randn(d, 2, generator=g).double(), torch.randn(5, 2, generator=g).double()
    prev = torch.randn(d, 2, generator=g).double()
    for with_prev in (False, True):
        dW = alphaedit_update(R, K, P, prev @ prev.T * with_prev, l2=1e-4)
        assert (dW @ K0).abs().max() < 1e-5 * (dW @ K).abs().max()  # ΔW K₀ ≈ 0 (up to rounding)
        assert (dW @ K - R).norm() < 0.05 * R.norm()  # the new keys still reach their residuals
        if with_prev:
            assert (dW @ prev).norm() < 0.05 * R.norm()  # and earlier edits' keys are barely moved
    # Without a null space (P = 0) nothing may change.
    assert alphaedit_update(R, K, torch.zeros(d, d), torch.zeros(d, d), l2=1.0).abs().max() == 0


def test_edits_stay_in_the_null_space_and_accumulate_previous_keys(tiny, tmp_path):
    model, _ = tiny
    before = snapshot(model)
    # A threshold that splits the spectrum of the tiny model's key statistics in two.
    method = make(tiny, tmp_path, name="alphaedit", nullspace_threshold=1e-5, L2=1e-3)
    P = method.projections
    assert all(0 < p.trace().round() < len(p) for p in P)
    try:
        stats = method.edit(REQS[:1])  # one request per step
        assert stats["skipped_missing_subject"] == 0
        first = [c.clone() for c in method.prev_cov]
        assert all(c.norm() > 0 for c in first)
        method.edit(REQS[1:])  # then a batch (one of which is skipped)
        for w, w0, p in zip(method.weights, method.original_weights, P):
            dW = (w - w0).double()
            assert dW.norm() > 0
            torch.testing.assert_close(dW @ p.double(), dW, atol=1e-6 * dW.abs().max().item(), rtol=1e-4)  # ΔW = ΔW P
        assert all(not torch.equal(c, f) for c, f in zip(method.prev_cov, first))
        state = method.state_dict()
        method.restore()
        assert_same(model, before)
        assert all(c.norm() == 0 for c in method.prev_cov)
        method.load_state_dict(state)
        assert all(torch.equal(c, s) for c, s in zip(method.prev_cov, state["prev_cov"]))
        assert all(torch.equal(w, s) for w, s in zip(method.weights, state["weights"]))
    finally:
        method.restore()
    assert_same(model, before)


def test_batch_sequential_run_in_the_loop(compose, data_dir, tmp_path):
    cfg = compose([f"data_dir={data_dir}", "method=alphaedit", "edit_mode=batch", "edit_mode.batch_size=2", "num_edits=4",
                   "eval_every=2", f"method.stats_dir={tmp_path / 'stats'}", *FAST_CLI])
    assert cfg.method.layers == LAYERS  # falls back to the MEMIT layers when the model names none
    results = run(cfg, tmp_path)
    assert (results["edit_mode"], results["batch_size"], results["method"]) == ("batch", 2, "alphaedit")
    points = read_points(tmp_path)
    assert [(p["n_edits"], p["batch_size"]) for p in points] == [(2, 2), (4, 2)] and points[-1]["rel"] == results["rel"]
