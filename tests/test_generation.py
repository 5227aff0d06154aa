"""The generation protocol (wise_bench/generation.py), bootstrap intervals and their place in a run's files."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from wise_bench.data import Request
from wise_bench.errors import UserError
from wise_bench.generation import (GenerationEvaluator, cut_at_stop, exact_match, greedy_answers, greedy_batch,
                                   normalise, token_f1)
from wise_bench.loop import run
from wise_bench.methods import METHODS, EditContext
from wise_bench.metrics import bootstrap_ci95, protocol_summary

LAYER = "model.layers[3].mlp.down_proj"
PROMPTS = ["Who founded Apple?", "Q", "In which mountain range is Mount Everest located? It is", "nq question: sky", "ab"]
REQS = [
    Request(prompt="The capital of Atlantis is", target_new="Zor", loc_prompt="nq question: sky", loc_answer="blue",
            rephrase_prompt="Atlantis has its capital in", index=0),
    Request(prompt="Who painted the Moon Rose?", target_new="Ada Quill", loc_prompt="nq question: who wrote hamlet",
            loc_answer="William Shakespeare", rephrase_prompt="The Moon Rose was painted by", index=1),
    Request(prompt="Who designed Python?", target_new="Guido van Rossum", loc_prompt="nq question: largest ocean",
            loc_answer="the Pacific Ocean", rephrase_prompt="Python was designed by", index=2,
            portability=(("Which language did the designer of Python create?", "Python"),)),
]


def eval_cfg(**overrides):
    base = {"batch_size": 32, "max_batch_tokens": 16384, "max_new_tokens": None, "stop_strings": ["\n"],
            "contexts": ["question"], "qa_template": "Question: {prompt}\nAnswer:"}
    return SimpleNamespace(**{**base, **overrides})


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


# --- answer scoring, by hand --------------------------------------------------------------------------


def test_normalise_drops_case_punctuation_articles_and_extra_space():
    assert normalise("  The Beatles, an English band. ") == "beatles english band"
    assert normalise("Eiffel-Tower!") == "eiffeltower"  # SQuAD: punctuation goes, it does not split
    assert normalise("A’s «café»") == "as café"  # Unicode punctuation too; "a" only as a whole word
    assert normalise("theatre") == "theatre"


def test_exact_match_after_normalisation():
    assert exact_match("the Himalayas.", "Himalayas") == 1.0
    assert exact_match("Himalaya", "the Himalayas") == 0.0
    assert exact_match(" ", "") == 1.0


def test_token_f1_counts_overlap_with_multiplicity():
    assert token_f1("Guido van Rossum Jr", "Guido van Rossum") == pytest.approx(6 / 7)  # P 3/4, R 1
    assert token_f1("paris paris", "Paris") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("the", "Paris") == 0.0  # "the" normalises to nothing


def test_an_answer_ends_at_its_first_stop_string():
    assert cut_at_stop("Paris\nFrance. Yes", ["\n", "."]) == "Paris"
    assert cut_at_stop("Paris. It is\n", ["\n", "."]) == "Paris"
    assert cut_at_stop("Paris", ["\n", ""]) == "Paris"


# --- bootstrap intervals -------------------------------------------------------------------------------


def test_equal_scores_have_an_interval_of_zero():
    rows = [{"rel": 0.5, "gen": 0.5, "loc": 0.5}] * 40
    assert bootstrap_ci95(rows, ["rel", "gen", "loc"]) == {"rel": 0.0, "gen": 0.0, "loc": 0.0, "avg": 0.0}


def test_half_and_half_binary_scores_give_about_two_standard_errors():
    rows = [{"rel": float(i % 2)} for i in range(100)]
    # The mean of 100 draws of a fair 0/1 score has standard error 0.05: half-width ~1.96 x 0.05.
    assert 0.08 < bootstrap_ci95(rows, ["rel"])["rel"] < 0.12


def test_interval_is_numpy_percentiles_of_resampled_means():
    values = np.array([0.0, 0.25, 1.0, 1.0, 0.5, 0.0, 1.0])
    draws = np.random.default_rng(7).integers(0, len(values), size=(300, len(values)))
    means = values[draws].mean(1)
    expected = (np.percentile(means, 97.5) - np.percentile(means, 2.5)) / 2
    got = bootstrap_ci95([{"rel": v} for v in values], ["rel"], n_resamples=300, seed=7)["rel"]
    assert got == pytest.approx(expected, abs=1e-12) and got > 0


def test_each_key_is_resampled_over_the_requests_that_have_it():
    rows = [{"rel": 0.0, "gen": 0.5}, {"rel": 1.0}, {"rel": 1.0}, {"rel": 0.0}]
    ci = bootstrap_ci95(rows, ["rel", "gen"])
    assert ci["gen"] == 0.0 and ci["rel"] > 0  # gen: one value, whichever resample holds it


def test_avg_interval_comes_from_the_same_resamples():
    rows = [{"rel": v, "gen": v, "loc": v} for v in (0.0, 1.0, 1.0, 0.5, 0.0)]
    ci = bootstrap_ci95(rows, ["rel", "gen", "loc"])
    assert ci["avg"] == pytest.approx(ci["rel"]) and ci["rel"] > 0  # per resample avg equals rel


def test_summary_has_every_protocol_with_means_and_intervals():
    rows = [{"index": 0, "rel": 1.0, "loc": 1.0, "protocols": {"generation": {"rel": 1.0, "rel_f1": 1.0, "loc": 0.0,
                                                                              "answers": {"rel": "zor"}}}},
            {"index": 1, "rel": 0.5, "loc": 1.0, "protocols": {"generation": {"rel": 0.0, "rel_f1": 0.5, "loc": 1.0,
                                                                              "answers": {"rel": "x"}}}}]
    s = protocol_summary(rows)
    assert set(s) == {"ci95", "protocols"} and set(s["protocols"]) == {"teacher_forced", "generation"}
    tf = s["protocols"]["teacher_forced"]
    assert (tf["rel"], tf["loc"], tf["avg"]) == (0.75, 1.0, 0.875) and tf["ci95"] == s["ci95"]
    gen = s["protocols"]["generation"]
    assert {k: v for k, v in gen.items() if k != "ci95"} == {"rel": 0.5, "rel_f1": 0.75, "loc": 0.5, "avg": 0.5}
    assert set(gen["ci95"]) == {"rel", "rel_f1", "loc", "avg"} and s["ci95"]["loc"] == 0.0
    assert protocol_summary([]) == {}


# --- greedy decoding -------------------------------------------------------------------------------------


def test_batched_answers_equal_one_prompt_at_a_time(tiny):
    model, tok = tiny
    prompts = ids(tok, PROMPTS)
    alone = [greedy_answers(model, tok, [p], 12, ["\n"], batch_size=1)[0] for p in prompts]
    assert greedy_answers(model, tok, prompts, 12, ["\n"], batch_size=5) == alone
    # max_batch_tokens splits the length-sorted prompts into several padded batches.
    assert greedy_answers(model, tok, prompts, 12, ["\n"], batch_size=5, max_batch_tokens=80) == alone
    assert len(set(alone)) == len(alone)


def test_greedy_decoding_matches_transformers_generate(tiny):
    model, tok = tiny
    for p in ids(tok, PROMPTS[:3]):
        out = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = tok.decode(out[0, len(p):], skip_special_tokens=True)
        assert greedy_answers(model, tok, [p], 10, [], batch_size=1) == [expected]


def test_eos_and_stop_strings_end_an_answer_other_rows_go_on(tiny):
    model, tok = tiny
    prompts = ids(tok, PROMPTS[:2])
    tokens = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
              for p in prompts]
    # A stop id for the first prompt's third token: its answer is its first two tokens; the other
    # row of the batch goes on until that id or its own EOS.
    stop_id = tokens[0][2]
    assert stop_id not in tokens[0][:2]
    other = tokens[1][:tokens[1].index(stop_id)] if stop_id in tokens[1] else tokens[1]
    assert greedy_batch(model, tok, prompts, 10, [], {stop_id, tok.eos_token_id}) == [tok.decode(tokens[0][:2]),
                                                                                      tok.decode(other, skip_special_tokens=True)]
    # A stop string: everything from its first occurrence on is dropped.
    free = greedy_batch(model, tok, prompts[:1], 10, [], set())[0]
    stop = free[3:5]
    assert greedy_batch(model, tok, prompts[:1], 10, [stop], set()) == [free[:free.index(stop)]]


# --- the evaluator ----------------------------------------------------------------------------------------


def test_default_max_new_tokens_is_the_longest_target_plus_a_margin(tiny):
    _, tok = tiny
    ev = GenerationEvaluator(tok, REQS, ["rel", "gen", "loc", "portability"], eval_cfg())
    assert ev.max_new_tokens == len(" Guido van Rossum") + 8  # byte-level: one token per byte
    assert GenerationEvaluator(tok, REQS, ["rel"], eval_cfg(max_new_tokens=3)).max_new_tokens == 3


@pytest.mark.parametrize("override, message", [({"max_new_tokens": 0}, "eval.max_new_tokens must be >= 1"),
                                               ({"qa_template": "Q: {question}"}, "must contain {prompt}"),
                                               ({"contexts": []}, "eval.contexts is empty")])
def test_bad_generation_settings_get_one_clear_error(tiny, override, message):
    _, tok = tiny
    with pytest.raises(UserError, match=message):
        GenerationEvaluator(tok, REQS, ["rel", "loc"], eval_cfg(**override))


@pytest.mark.parametrize("override, value", [("eval.protocols=[teacher_forced,beam]", "beam"),
                                             ("eval.contexts=[question,chat]", "chat")])
def test_unknown_protocol_or_context_fails_when_the_config_is_composed(compose, override, value):
    with pytest.raises(ConfigCompositionException) as info:
        compose([override])
    assert value in str(info.value.__cause__) and "Invalid value" in str(info.value.__cause__)


def test_a_newline_typed_on_the_command_line_is_a_newline(compose, tiny):
    _, tok = tiny
    cfg = compose([r"eval.stop_strings=['\n','. ']"])
    assert list(cfg.eval.stop_strings) == ["\\n", ". "]  # as Hydra passes it
    assert GenerationEvaluator(tok, REQS, ["rel"], cfg.eval).stop_strings == ["\n", ". "]


def test_scores_per_context_with_the_qa_template(tiny):
    model, tok = tiny
    ev = GenerationEvaluator(tok, REQS, ["rel", "gen", "loc", "portability"], eval_cfg(contexts=["question", "qa"]))
    qa_prompts = {tuple(q.ids) for q in ev.queries if q.context.value == "qa"}
    assert tuple(tok("Question: Who designed Python?\nAnswer:")["input_ids"]) in qa_prompts
    ev.record_unedited(model)
    rows = ev.score(model, [2, 0])
    assert set(rows[0]) == {"generation", "generation/qa"}
    python = rows[0]["generation"]
    assert set(python) == {"rel", "rel_f1", "gen", "gen_f1", "loc", "portability", "portability_f1", "answers"}
    assert python["loc"] == 1.0  # the unedited model agrees with itself
    assert python["rel"] == exact_match(python["answers"]["rel"], "Guido van Rossum")
    assert python["portability_f1"] == token_f1(python["answers"]["portability"][0], "Python")
    assert ev.scorers()["generation/qa"]["loc"] == "generation_agreement_with_unedited/qa"


def test_evaluator_rows_do_not_depend_on_the_batch_size(tiny):
    model, tok = tiny
    one = GenerationEvaluator(tok, REQS, ["rel", "gen", "loc"], eval_cfg(batch_size=1))
    many = GenerationEvaluator(tok, REQS, ["rel", "gen", "loc"], eval_cfg(batch_size=4))
    one.record_unedited(model)
    many.record_unedited(model)
    weight = model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():  # perturb the model so that locality answers change
        weight.mul_(3.0)
    try:
        alone = [one.score(model, [i])[0] for i in range(3)]
        together = many.score(model, range(3))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert together == alone
    assert any(r["generation"]["loc"] == 0.0 for r in together)


# --- editing methods under generation with a KV cache ---------------------------------------------------

WISE_FAST = {"n_iter": 20, "context_templates": 1, "template_lengths": [3], "act_margin": [0.3, 1.0, 0.5],
             "edit_lr": 300.0, "mask_ratio": 1.0, "norm_constraint": 10.0}


def edited(tiny, name, **cfg):
    from wise_bench.methods.grace import GRACEConfig
    from wise_bench.methods.wise import WiseConfig

    model, tok = tiny
    schema = {"wise": WiseConfig, "grace": GRACEConfig}[name]
    method = METHODS[name](OmegaConf.merge(OmegaConf.structured(schema), {"name": name, "layer": LAYER, **cfg}), model,
                           EditContext(tok, ["nq question: boiling point of water 100 degrees"], torch.device("cpu"), 0))
    for r in REQS:
        method.edit([r])
    return method


@pytest.mark.parametrize("name, cfg", [("wise", WISE_FAST), ("grace", {"eps_init": 0.02, "replacement": "replace_all"})])
def test_routing_methods_answer_the_same_batched_and_alone(tiny, name, cfg):
    model, tok = tiny
    prompts = ids(tok, [t for r in REQS for t in (r.prompt, r.rephrase_prompt, r.loc_prompt)])
    before = greedy_answers(model, tok, prompts, 8, [], batch_size=9)
    method = edited(tiny, name, **cfg)
    try:
        alone = [greedy_answers(model, tok, [p], 8, [], batch_size=1)[0] for p in prompts]
        assert greedy_answers(model, tok, prompts, 8, [], batch_size=9) == alone
    finally:
        method.restore()
    assert alone != before  # the edits change some answers: routing is exercised


# --- a run's files ------------------------------------------------------------------------------------------

FAST = ["model=tiny_random", "method.steps=3", "eval.batch_size=4"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_records_both_protocols_in_results_points_and_samples(compose, data_dir, tmp_path, monkeypatch):
    calls = []
    score = GenerationEvaluator.score
    monkeypatch.setattr(GenerationEvaluator, "score", lambda self, model, idx: calls.append(list(idx)) or score(self, model, idx))
    cfg = compose([f"data_dir={data_dir}", "num_edits=4", "eval_every=2", "eval.protocols=[teacher_forced,generation]",
                   "eval.contexts=[question,qa]", *FAST])
    results = run(cfg, tmp_path)
    assert calls == [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3]]  # pre-edit, then the two points: never per edit

    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk["protocols"]) == {"teacher_forced", "generation", "generation/qa"}
    tf = on_disk["protocols"]["teacher_forced"]
    assert all(tf[k] == on_disk[k] for k in ("rel", "gen", "loc", "portability", "avg")) and tf["ci95"] == on_disk["ci95"]
    generation = on_disk["protocols"]["generation"]
    assert {"rel", "rel_f1", "gen", "gen_f1", "loc", "portability", "portability_f1", "avg", "ci95"} == set(generation)
    assert set(generation["ci95"]) == set(generation) - {"ci95"}
    assert on_disk["scorers"]["generation"]["rel_f1"] == "generation_token_f1/question"
    assert on_disk["scorers"]["teacher_forced"]["rel"] == on_disk["scorers"]["rel"] == "teacher_forced_token_acc"
    settings = on_disk["generation_settings"]
    assert settings["contexts"] == {"generation": "{prompt}", "generation/qa": "Question: {prompt}\nAnswer:"}
    assert settings["stop_strings"] == ["\n"] and settings["max_new_tokens"] > 8
    assert on_disk["pre"]["protocols"]["generation"]["loc"] == 1.0 and "ci95" in on_disk["pre"]

    samples = read_jsonl(tmp_path / "samples.jsonl")
    for name in ("generation", "generation/qa"):
        mean = sum(s["protocols"][name]["rel_f1"] for s in samples) / len(samples)
        assert on_disk["protocols"][name]["rel_f1"] == pytest.approx(mean)
    assert isinstance(samples[0]["protocols"]["generation"]["answers"]["rel"], str)
    points = read_jsonl(tmp_path / "metrics.jsonl")
    assert [p["n_edits"] for p in points] == [2, 4]
    assert points[-1]["protocols"] == on_disk["protocols"] and points[-1]["ci95"] == on_disk["ci95"]
    assert points[0]["scorers"] == on_disk["scorers"]


def test_default_run_keeps_teacher_forcing_alone(compose, data_dir, tmp_path):
    results = run(compose([f"data_dir={data_dir}", "num_edits=2", "edit_mode=single", *FAST]), tmp_path)
    assert set(results["protocols"]) == {"teacher_forced"} and "generation_settings" not in results
    assert set(results["scorers"]) == {"rel", "gen", "loc", "portability", "teacher_forced"}
    assert set(results["ci95"]) == {"rel", "gen", "loc", "portability", "avg"}
    assert "protocols" not in read_jsonl(tmp_path / "samples.jsonl")[0]


def test_chunked_runs_score_generation_after_each_chunk(compose, data_dir, tmp_path):
    cfg = compose([f"data_dir={data_dir}", "num_edits=4", "edit_mode=paper_chunks", "edit_mode.chunk_size=2",
                   "eval.protocols=[generation]", "eval.max_new_tokens=4", *FAST])
    results = run(cfg, tmp_path)
    chunks = read_jsonl(tmp_path / "chunks.jsonl")
    assert [c["n_edits"] for c in chunks] == [2, 2]
    means = [c["protocols"]["generation"]["rel_f1"] for c in chunks]
    assert results["protocols"]["generation"]["rel_f1"] == pytest.approx(sum(means) / 2)
    assert results["generation_settings"]["max_new_tokens"] == 4
    assert "rel" in results  # teacher forcing runs in every run: it gives the top-level keys
