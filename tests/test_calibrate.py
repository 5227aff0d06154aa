"""python -m wise_bench.calibrate: the rules on hand-made numbers, on a tiny random model whose
activation scale the test sets, and the file it writes."""
import subprocess
import sys

import pytest
import torch
from conftest import REPO, ZSRE
from omegaconf import OmegaConf

from wise_bench.calibrate import method_block, write_block
from wise_bench.config import ModelConfig, RandomInitConfig
from wise_bench.data import Request, load_dataset
from wise_bench.loop import method_config
from wise_bench.methods import METHODS, EditContext
from wise_bench.methods.grace import GRACEConfig
from wise_bench.methods.rome import locate
from wise_bench.methods.wise import OUT_MARGIN_OFF, WiseConfig, margins_from_probe, routing_ratio
from wise_bench.models import get_module, load_model, load_tokenizer

LAYER = "model.layers[2].mlp.down_proj"
REQS = [Request(prompt=r["src"], target_new=r["alt"], loc_prompt=r["loc"], loc_answer=r["loc_ans"],
                rephrase_prompt=r["rephrase"], index=i) for i, r in enumerate(ZSRE)]


def scaled_model(scale: float):
    """tiny_random with the edited layer's input multiplied by ``scale`` (up_proj scaled: the
    down projection's input is act(gate x) * up x)."""
    cfg = ModelConfig(name="tiny_random", random_init=RandomInitConfig())
    tok = load_tokenizer(cfg)
    model = load_model(cfg, len(tok), torch.device("cpu"))
    with torch.no_grad():
        get_module(model, "model.layers[2].mlp.up_proj").weight.mul_(scale)
    return model, tok


def grace_eps(model, tok) -> tuple[float, dict]:
    cfg = OmegaConf.merge(OmegaConf.structured(GRACEConfig), {"name": "grace", "layer": LAYER})
    result = METHODS["grace"].calibrate(cfg, model, EditContext(tok, [], torch.device("cpu"), 0), REQS)
    return result.values["grace_eps_init"], result.measured


def down_proj_inputs(model, tok, text: str) -> torch.Tensor:
    """The layer's input at every position of ``text`` alone (no batching, no padding)."""
    seen = []
    hook = get_module(model, LAYER).register_forward_pre_hook(lambda _m, a: seen.append(a[0][0]))
    with torch.no_grad():
        model(**tok(text, return_tensors="pt"))
    hook.remove()
    return seen[0]


def test_grace_radius_is_half_the_1pct_quantile_of_other_inputs_distance_to_the_keys():
    model, tok = scaled_model(1.0)
    eps, measured = grace_eps(model, tok)
    # By hand: keys at the position before each target; others = every position of each
    # irrelevant text and each paraphrase's key position; distance to the nearest key.
    def key(prompt, target):
        # the position before the first token holding a character of the target
        offsets = tok(f"{prompt} {target}", return_offsets_mapping=True)["offset_mapping"]
        first = next(i for i, (_, end) in enumerate(offsets) if end > len(prompt) + 1)
        return down_proj_inputs(model, tok, f"{prompt} {target}")[first - 1]

    keys = torch.stack([key(r.prompt, r.target_new) for r in REQS])
    others = [down_proj_inputs(model, tok, f"{r.loc_prompt} {r.loc_answer}") for r in REQS]
    others += [key(r.rephrase_prompt, r.target_new)[None] for r in REQS]
    d = torch.cdist(torch.cat(others), keys).min(-1).values
    assert eps == pytest.approx(0.5 * float(torch.quantile(d, 0.01)), rel=1e-3)
    assert measured["irrelevant_within_eps"] <= 0.01


def test_grace_radius_follows_the_activation_scale():
    eps1, _ = grace_eps(*scaled_model(1.0))
    eps30, _ = grace_eps(*scaled_model(30.0))
    assert eps30 == pytest.approx(30 * eps1, rel=1e-3)


def test_wise_margins_keep_the_reference_proportions_while_irrelevant_texts_stay_quiet():
    # median of [10, 40, 20, 30, 50] = 30: alpha 7.5, beta 30, gamma 15 (the reference's 5:20:10),
    # as long as the irrelevant texts' median after the edits (7.0 here) is at most alpha.
    in_scope = torch.tensor([10.0, 40.0, 20.0, 30.0, 50.0])
    assert margins_from_probe(in_scope, torch.tensor([1.0, 7.0, 9.0])) == [7.5, 30.0, 15.0]
    assert margins_from_probe(in_scope, torch.tensor([1.0, 7.5, 9.0])) == [7.5, 30.0, 15.0]  # the boundary


def test_wise_margins_turn_l_out_off_and_route_by_the_gap_when_edits_make_irrelevant_texts_loud():
    in_scope = torch.tensor([10.0, 40.0, 20.0, 30.0, 50.0])
    # irrelevant scores 0, 1, ..., 100: median 50 > alpha 7.5; their 99% quantile is 99 (linear
    # interpolation at position 0.99 x 100), which becomes gamma; beta stays the probe median.
    assert margins_from_probe(in_scope, torch.arange(101, dtype=torch.float32)) == [OUT_MARGIN_OFF, 30.0, 99.0]


def test_wise_ratio_is_the_smallest_that_keeps_99pct_of_irrelevant_texts_out():
    irrelevant = torch.arange(100, dtype=torch.float32)  # scores 0..99
    # floor 100: ratio r routes the scores >= 100 r; 0.99 would allow 1 of 100, the grid stops at
    # 0.95, which routes 5: no ratio qualifies, so the strictest is returned.
    assert routing_ratio(irrelevant, 100.0) == 0.95
    # floor 200: r = 0.50 routes scores >= 100: none; 0.45 routes >= 90: ten (10%) -> 0.50.
    assert routing_ratio(irrelevant, 200.0) == 0.5
    # floor 1000: even 0.30 (>= 300) routes none.
    assert routing_ratio(irrelevant, 1000.0) == 0.3


def test_wise_calibration_runs_its_probes_on_a_model():
    model, tok = scaled_model(1.0)
    cfg = OmegaConf.merge(OmegaConf.structured(WiseConfig), {
        "name": "wise", "layer": LAYER, "n_iter": 5, "context_templates": 1, "template_lengths": [2]})
    texts = [f"{r.loc_prompt} {r.loc_answer}" for r in REQS]
    result = METHODS["wise"].calibrate(cfg, model, EditContext(tok, texts, torch.device("cpu"), 0), REQS)
    margins, m = result.values["wise_act_margin"], result.measured
    beta = margins[1]
    assert beta == pytest.approx(m["probe_in_scope_score_median"], rel=1e-3)
    if m["unrouted_irrelevant_score_median"] <= beta / 4:
        assert m["l_out"] == "on" and margins == pytest.approx([beta / 4, beta, beta / 2], rel=1e-3)
    else:
        assert m["l_out"] == "off" and margins == pytest.approx([OUT_MARGIN_OFF, beta, m["unrouted_irrelevant_score_q99"]], rel=1e-3)
    assert 0.3 <= result.values["wise_act_ratio"] <= 0.95
    assert m["irrelevant_routed_at_ratio"] <= 0.01 or result.values["wise_act_ratio"] == 0.95
    # The probes leave the model as it was.
    assert type(get_module(model, LAYER)).__name__ == "Linear"


def test_write_block_replaces_one_method_and_keeps_the_others(tmp_path):
    path = tmp_path / "m.yaml"
    write_block(path, "wise", method_block("wise", {"wise_act_ratio": 0.5}, {"n": 3}, "cmd"))
    write_block(path, "grace", method_block("grace", {"grace_eps_init": 2.0}, {}, "cmd"))
    write_block(path, "wise", method_block("wise", {"wise_act_ratio": 0.7}, {"n": 4}, "cmd"))
    assert OmegaConf.to_container(OmegaConf.load(path)) == {"grace_eps_init": 2.0, "wise_act_ratio": 0.7}
    text = path.read_text()
    assert text.count("# --- wise ---") == 1 and "#   n: 4" in text and "#   n: 3" not in text


def test_model_config_composes_its_calibration(compose):
    cfg = compose(["model=small", "method=grace"])
    calibrated = OmegaConf.load(REPO / "conf" / "calibration" / "small.yaml")
    assert {"grace_eps_init", "wise_act_margin", "wise_act_ratio", "memit_mom2_update_weight"} <= calibrated.keys()
    for key, value in calibrated.items():
        assert cfg.model.hparams[key] == value
    assert cfg.method.eps_init == calibrated["grace_eps_init"] != 1.0  # not the LLaMA-2 default


def test_calibrate_cli_writes_the_file_and_refuses_uncalibrated_methods(tmp_path, data_dir, tiny, compose):
    out = tmp_path / "cal.yaml"
    base = [sys.executable, "-m", "wise_bench.calibrate", "model=tiny_random", f"data_dir={data_dir}",
            "dataset=zsre", "num_edits=3", f"out={out}", f"hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(base + ["method=grace", "method.n_iter=7"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The recorded command names the method setting it was measured with.
    assert "method=grace dataset=zsre num_edits=3 'method.n_iter=7'" in out.read_text()
    # The file holds the radius GRACE's calibration measures in-process on the same three requests.
    model, tok = tiny
    cfg = compose([f"data_dir={data_dir}", "dataset=zsre", "num_edits=3", "method=grace"])
    dataset = load_dataset(cfg.dataset, data_dir, 3)
    cls, method_cfg = method_config(cfg)
    expected = cls.calibrate(method_cfg, model, EditContext(tok, dataset.train_texts, torch.device("cpu"), 0), dataset.requests)
    assert OmegaConf.load(out).grace_eps_init == pytest.approx(expected.values["grace_eps_init"], rel=1e-6)
    refused = subprocess.run(base + ["method=ft_m"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "no scale-dependent hyperparameter" in refused.stdout + refused.stderr


def test_memit_lambda_gives_the_median_edit_key_the_references_weight(tmp_path):
    from wise_bench.methods.memit import REFERENCE_KEY_DIM, REFERENCE_LAMBDA

    words = ["rivers", "kings", "stars", "cats", "maps", "songs", "ships", "laws"]
    corpus = [f"nq question: who wrote {a} and {b}, volume {i}?" for i, (a, b) in enumerate(zip(words * 8, words[3:] * 8 + words[:3] * 8))]
    reqs = [Request(prompt=r["src"], target_new=r["alt"], loc_prompt=r["loc"], loc_answer=r["loc_ans"],
                    subject=r["subject"], index=i) for i, r in enumerate(ZSRE)]

    def calibrated(scale: float, stats: str):
        model, tok = scaled_model(scale)
        cfg = OmegaConf.merge(OmegaConf.structured(METHODS["memit"].Config), {
            "name": "memit", "layers": ["model.layers[1].mlp.down_proj", LAYER], "stats_dir": str(tmp_path / stats),
            "context_templates": 0, "v_steps": 2, "mom2_dataset": "train_texts"})  # no sampled prefixes: they depend on the scale
        ctx = EditContext(tok, corpus, torch.device("cpu"), 0)
        result = METHODS["memit"].calibrate(cfg, model, ctx, reqs)
        return result.values["memit_mom2_update_weight"], result.measured, METHODS["memit"](cfg, model, ctx)

    lam, measured, method = calibrated(1.0, "a")
    # By hand at one layer: k^T C^-1 k with C the cached second moment and k the subject key.
    norms = method.whitened_key_norms(reqs)
    (K,) = method.subject_vectors(locate(reqs, "skip")[0], [(method.modules[1], "input")])
    C, k = method.mom2[1].double(), K[0].double()
    assert norms[len(reqs)] == pytest.approx(float(k @ torch.linalg.inv(C) @ k), rel=1e-6)
    assert lam == pytest.approx(float(norms.median()) * REFERENCE_LAMBDA / REFERENCE_KEY_DIM, rel=1e-3)
    # Whitened norms do not depend on the scale of the keys: neither does λ.
    assert calibrated(10.0, "b")[0] == pytest.approx(lam, rel=1e-3)
