"""The offline default model knows the benchmark's true facts (issue: model=tiny)."""
import dataclasses

import pytest
import torch

from wise_bench.config import DataFormat, DatasetConfig, ModelConfig
from wise_bench.data import load_dataset
from wise_bench.metrics import Evaluator
from wise_bench.models import load_model, load_tokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(name="tiny", name_or_path="models/tiny")
    tok = load_tokenizer(cfg)
    return load_model(cfg, len(tok), torch.device("cpu")), tok


def test_tiny_model_knows_true_answers_and_locality_pairs(shared_data, tiny_model):
    model, tok = tiny_model
    cfg = DatasetConfig(name="zsre", format=DataFormat.zsre, edit_file="zsre/zsre_mend_edit.json")
    reqs = load_dataset(cfg, shared_data, 1000).requests[::5]  # a 200-request sample
    true = [dataclasses.replace(r, target_new=r.ground_truth) for r in reqs]
    ev = Evaluator(tok, true, DataFormat.zsre, ["rel", "gen"], batch_size=64)
    ev.record_unedited_locality(model)
    known, _ = ev.evaluate(model, range(len(true)))
    assert known["rel"] >= 0.9  # the edit prompts' true answers
    assert known["gen"] >= 0.5  # held-out paraphrases (never trained on)
    # Locality pairs: the gold NQ answers, scored as targets.
    loc = [dataclasses.replace(r, prompt=r.loc_prompt, target_new=r.loc_answer, rephrase_prompt=None) for r in reqs]
    ev = Evaluator(tok, loc, DataFormat.zsre, ["rel"], batch_size=64)
    ev.record_unedited_locality(model)
    assert ev.evaluate(model, range(len(loc)))[0]["rel"] >= 0.9
    # ... and the new targets are mostly unknown before editing.
    ev = Evaluator(tok, reqs, DataFormat.zsre, ["rel"], batch_size=64)
    ev.record_unedited_locality(model)
    assert ev.evaluate(model, range(len(reqs)))[0]["rel"] < 0.3


def test_default_model_is_tiny_and_resolves_to_the_repo(compose):
    cfg = compose([], test_model=None)
    assert cfg.model.name == "tiny" and cfg.model.name_or_path == "models/tiny"
