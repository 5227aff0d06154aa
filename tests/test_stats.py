import json

import pytest
import torch

import wise_bench.stats as stats
from wise_bench.errors import UserError
from wise_bench.models import get_module

LAYERS = ["model.layers[0].mlp.down_proj", "model.layers[1].mlp.down_proj"]
CORPUS = [f"nq question: what is fact number {i} about {w}" for i, w in enumerate(["rivers", "kings", "stars", "cats", "songs", "maps"])]


def moments(tiny, tmp_path, layers=LAYERS, n=100):
    model, tok = tiny
    return stats.second_moments(model, tok, layers, "train_texts", CORPUS, n_samples=n, stats_dir=tmp_path, max_length=64)


def test_second_moment_is_the_mean_outer_product_of_layer_inputs(tiny, tmp_path):
    model, tok = tiny
    inputs = []
    handle = get_module(model, LAYERS[1]).register_forward_pre_hook(lambda _m, args: inputs.append(args[0][0]))
    try:
        with torch.no_grad():
            for text in CORPUS:  # one at a time: no padding
                model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    keys = torch.cat(inputs)
    expected = keys.T @ keys / len(keys)
    C = moments(tiny, tmp_path)[LAYERS[1]]
    assert C.shape == (128, 128)
    torch.testing.assert_close(C, expected, rtol=1e-4, atol=1e-9)


def test_cached_on_disk_and_reused(tiny, tmp_path, monkeypatch):
    first = moments(tiny, tmp_path)
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 2  # one per layer, from one pass

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(stats, "collect_second_moments", no_recompute)
    second = moments(tiny, tmp_path)
    assert all(torch.equal(first[k], second[k]) for k in LAYERS)


def test_key_changes_with_layer_samples_corpus_and_dtype(tiny):
    model, _ = tiny
    base = stats.stats_key(model, LAYERS[0], "train_texts", CORPUS, 64, torch.float32)
    variants = [
        stats.stats_key(model, LAYERS[1], "train_texts", CORPUS, 64, torch.float32),
        stats.stats_key(model, LAYERS[0], "train_texts", CORPUS[:3], 64, torch.float32),
        stats.stats_key(model, LAYERS[0], "train_texts", [t + "!" for t in CORPUS], 64, torch.float32),
        stats.stats_key(model, LAYERS[0], "train_texts", CORPUS, 64, torch.float64),
        stats.stats_key(model, LAYERS[0], "train_texts", CORPUS, 32, torch.float32),
    ]
    paths = {k.path("/s") for k in [base, *variants]}
    assert len(paths) == 6
    assert base.n_samples == len(CORPUS) and variants[1].n_samples == 3


def test_sample_count_limits_the_corpus(tiny, tmp_path):
    few, all_ = moments(tiny, tmp_path, LAYERS[:1], n=2), moments(tiny, tmp_path, LAYERS[:1], n=100)
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    assert not torch.allclose(few[LAYERS[0]], all_[LAYERS[0]])


def test_local_corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\none\n")
    (tmp_path / "b.json").write_text(json.dumps([{"src": "q?", "alt": "", "answers": ["x"], "loc": "nq: y"}, "plain"]))
    (tmp_path / "c.jsonl").write_text('{"text": "t1", "other": "no"}\n{"text": "t2"}\n')
    assert stats.load_corpus(str(tmp_path / "a.txt")) == ["one", "two"]
    assert stats.load_corpus(str(tmp_path / "b.json")) == ["q?", "nq: y", "plain"]
    assert stats.load_corpus(str(tmp_path / "c.jsonl")) == ["t1", "t2"]
    assert stats.load_corpus("train_texts", ["a", "a", "b"]) == ["a", "b"]
    with pytest.raises(UserError, match="not found"):
        stats.load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="no train_file"):
        stats.load_corpus("train_texts", [])
