"""scripts/bench.py: the fast paths must agree with the naive reference it times them against."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, load_script

KEYS = {"method", "model", "edit_s_per_edit", "edit_s_per_edit_naive", "edit_speedup", "eval_req_per_s",
        "eval_req_per_s_naive", "eval_speedup", "peak_mem_mb", "generation_req_per_s",
        "generation_req_per_s_one_at_a_time", "generation_speedup"}


@pytest.fixture(scope="module")
def bench():
    """The script as a module, for its functions (its Hydra app runs in a subprocess below)."""
    yield load_script("bench")
    del sys.modules["bench"]


def bench_config(*overrides: str):
    """conf/bench.yaml on tiny_random, composed as the script's Hydra app composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("bench", ["model=tiny_random", *overrides])


def check_figures(result: dict, method: str, threads: int) -> None:
    assert KEYS <= result.keys() and (result["method"], result["model"]) == (method, "tiny_random")
    assert (result["num_edits"], result["eval_requests"], result["eval_batch_size"], result["threads"]) == (2, 3, 32, threads)
    assert result["has_fast_path"] and result["first_edit_cache_state_difference"] == 0.0
    assert result["edited_params_agree"] and result["eval_rows_agree"]
    assert result["edit_speedup"] == pytest.approx(result["edit_s_per_edit_naive"] / result["edit_s_per_edit"])
    assert result["generation_answers_agree"]
    assert result["generation_speedup"] == pytest.approx(result["generation_req_per_s"] / result["generation_req_per_s_one_at_a_time"])
    # The fixture's first 3 ZsRE records: 3 edit prompts, 3 paraphrases, 3 locality prompts, 1 portability question.
    assert result["generation_prompts"] == 10


def test_ft_m_figures_and_its_fast_paths_agree_with_the_naive_ones(bench, data_dir):
    import torch

    # threads left null: setting it here would change the thread count of the whole test session.
    cfg = bench_config("method=ft_m", "method.steps=3", "num_edits=2", "eval_requests=3", f"data_dir={data_dir}")
    check_figures(bench.bench(cfg), "ft_m", torch.get_num_threads())


def test_the_script_writes_the_figures_to_its_run_directory(data_dir, tmp_path):
    # As the docs run it, from outside the repository; out= unset: <run dir>/bench.json.
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "model=tiny_random", "method=grace",
                          "method.n_iter=3", "num_edits=2", "eval_requests=3", "threads=1", f"data_dir={data_dir}",
                          "compare=[grace,ft_m]", "+compare_batch.ft_m=2",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "bench.json").read_text())
    check_figures(result, "grace", 1)
    grace, ft_m = result["compare"]["grace"], result["compare"]["ft_m"]
    assert (grace["requests_per_step"], ft_m["requests_per_step"]) == (1, 2)
    assert grace["edits_per_s_vs_first"] == 1.0
    assert ft_m["edits_per_s_vs_first"] == pytest.approx(grace["s_per_edit"] / ft_m["s_per_edit"])
    assert "edit s/edit: fast" in res.stdout and "generation requests/s: batched" in res.stdout


@pytest.mark.parametrize("override, message", [("eval_requests=0", "eval_requests must be >= 1"),
                                               ("threads=0", "threads must be >= 1")])
def test_a_count_below_one_is_refused_before_any_model_loads(bench, data_dir, override, message):
    from wise_bench.errors import UserError

    with pytest.raises(UserError, match=message):
        bench.bench(bench_config("method=ft_m", override, f"data_dir={data_dir}"))


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
