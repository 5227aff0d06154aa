"""scripts/bench.py: the fast paths must agree with the naive reference it times them against."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KEYS = {"method", "model", "edit_s_per_edit", "edit_s_per_edit_naive", "edit_speedup", "eval_req_per_s",
        "eval_req_per_s_naive", "eval_speedup", "peak_mem_mb"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method, small", [("ft_m", "method.steps=3"), ("grace", "method.n_iter=3")])
def test_bench_writes_the_figures_and_its_fast_paths_agree_with_the_naive_ones(bench, data_dir, tmp_path, method, small):
    out = tmp_path / "bench.json"
    code = bench.main(["--method", method, "--model", "tiny_random", "--num-edits", "2", "--eval-requests", "3",
                       "--out", str(out), f"data_dir={data_dir}", small])
    result = json.loads(out.read_text())
    assert code == 0 and KEYS <= result.keys() and (result["method"], result["model"]) == (method, "tiny_random")
    assert result["has_fast_path"] and result["first_edit_cache_state_difference"] == 0.0
    assert result["edited_params_agree"] and result["eval_rows_agree"]
    assert result["edit_speedup"] == pytest.approx(result["edit_s_per_edit_naive"] / result["edit_s_per_edit"])


def test_naive_target_logits_equal_the_fast_ones(bench, tiny):
    import torch

    from wise_bench.metrics import TokenBatch, encode_pair

    model, tok = tiny
    b = TokenBatch.build([encode_pair(tok, "Who wrote it?", "Shakespeare"), encode_pair(tok, "Q", "a b")], tok.pad_token_id, "cpu")
    with torch.no_grad():
        fast = b.target_logits(model)
        with bench.naive_forward():
            naive = b.target_logits(model)
    assert naive.shape == fast.shape and torch.allclose(naive, fast, atol=1e-5)
