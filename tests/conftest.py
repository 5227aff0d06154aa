from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models run fastest on one thread, and two OpenMP threads on a busy 2-core machine slow a
# forward pass ~50x; subprocesses (CLI tests) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("WISE_BENCH_SHARED_DATA", REPO.parent / "shared" / "data"))

# Small records in each benchmark format, with prompts of different lengths on purpose.
ZSRE = [
    {"subject": "Danielle Darrieux", "src": "What is the native language of Danielle Darrieux?", "rephrase": "Danielle Darrieux speaks which mother tongue?",
     "alt": "English", "answers": ["French"], "loc": "nq question: who sang hey jude", "loc_ans": "The Beatles",
     "portability": {"New Question": "Which country uses the native language of Danielle Darrieux?", "New Answer": "England"}},
    {"subject": "Apple", "src": "Who founded Apple?", "rephrase": "Apple was founded by whom?", "alt": "Bill Gates",
     "answers": ["Steve Jobs"], "loc": "nq question: capital of france", "loc_ans": "Paris"},
    {"subject": "Mount Everest", "src": "In which mountain range is Mount Everest located?", "rephrase": "Mount Everest belongs to what range?",
     "alt": "the Alps", "answers": ["the Himalayas"], "loc": "nq question: how many legs does a spider have", "loc_ans": "eight"},
    {"subject": "Python", "src": "Who designed Python?", "rephrase": "Python was designed by?", "alt": "Dennis Ritchie",
     "answers": ["Guido van Rossum"], "loc": "nq question: largest ocean", "loc_ans": "the Pacific Ocean"},
]
ZSRE_TRAIN = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?", "alt": "",
     "answers": ["uniform"], "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare"},
    {"subject": "Rhine", "src": "Into what does the Rhine flow?", "rephrase": "Where does the Rhine end?", "alt": "Baltic Sea",
     "answers": ["North Sea"], "loc": "nq question: boiling point of water", "loc_ans": "100 degrees"},
]
COUNTERFACT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English", "subject": "Danielle Darrieux",
     "ground_truth": "French", "rephrase_prompt": "Where Danielle Darrieux is from, people speak", "locality_prompt": "Michel Rocard is a native speaker of",
     "locality_ground_truth": "French"},
    {"case_id": 1, "prompt": "Toko Yasuda plays the", "target_new": "piano", "subject": "Toko Yasuda", "ground_truth": "guitar",
     "rephrase_prompt": "Toko Yasuda is incredible at the", "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
]
HALLUCINATION = [
    {"prompt": "This is a Wikipedia passage about carole gist. Carole Gist is an American beauty queen.", "target_new": "She was crowned Miss USA 1990.",
     "subject": "carole gist", "locality_prompt": "Description Map of South America.", "locality_ground_truth": "This map has a scratch."},
    {"prompt": "This is a Wikipedia passage about frank mclain.", "target_new": "He was a lawyer from Florida.", "subject": "frank mclain",
     "locality_prompt": "Academic Coach, Graduate School.", "locality_ground_truth": "At Creighton, you are part of something big."},
]
TEMPORAL = [
    {"prompt": "Tesla, Inc.,", "target_new": "is an American electric vehicle company.", "subject": "Tesla, Inc.,",
     "ood_rephrase": "Tesla, Inc., headquartered in Austin, Texas,", "locality_prompt": "What can we learn from EU colleagues?",
     "locality_ground_truth": "Simon examines the key areas."},
]


def load_script(name: str):
    """scripts/<name>.py as a module (registered under its name: dataclasses look their module up)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory laid out like the real one, with small fixture files in every format."""
    root = tmp_path / "data"
    write_json(root / "zsre/zsre_mend_edit.json", ZSRE)
    write_json(root / "zsre/zsre_mend_train-1k.json", ZSRE_TRAIN)
    write_json(root / "counterfact/counterfact-edit.json", COUNTERFACT)
    write_json(root / "counterfact/counterfact-train.json", COUNTERFACT)
    write_json(root / "hallucination/hallucination-edit.json", HALLUCINATION)
    write_json(root / "hallucination/hallucination-train.json", HALLUCINATION)
    write_json(root / "temporal/temporal-edit.json", TEMPORAL)
    write_json(root / "temporal/temporal-train.json", TEMPORAL)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "zsre" / "zsre_mend_edit.json").is_file():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA} (set WISE_BENCH_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the in-process tiny_random LLaMA, in eval mode, gradients off."""
    import torch

    from wise_bench.config import ModelConfig, RandomInitConfig
    from wise_bench.models import load_model, load_tokenizer

    cfg = ModelConfig(name="tiny_random", random_init=RandomInitConfig())
    tok = load_tokenizer(cfg)
    return load_model(cfg, len(tok), torch.device("cpu")), tok


@pytest.fixture
def compose():
    """compose(overrides) -> the config ``python -m wise_bench <overrides>`` would run with.

    Unit tests run on the in-process ``tiny_random`` model unless they name a model (or pass
    ``test_model=None`` to keep the app's default).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from wise_bench.config import register_configs

    register_configs()

    def _compose(overrides: list[str], test_model: str | None = "tiny_random"):
        if test_model and not any(o.startswith("model=") for o in overrides):
            overrides = [f"model={test_model}", *overrides]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)

    return _compose
