"""Every method on a model spread over several devices (`model.device_map=auto`), checked on CPU
with pretend devices (tests/fake_devices.py): each tensor must meet its module's device."""
import copy
import json

import pytest
import torch
from fake_devices import DeviceMismatch, FakeDevices, split_model
from test_loop import SMALL

from wise_bench.data import load_dataset
from wise_bench.evaluate import evaluate_saved
from wise_bench.loop import method_config, run
from wise_bench.methods import METHODS, EditContext
from wise_bench.models import input_device

SPLIT = [0, 1, 1, 2]  # tiny_random's 4 blocks: MEMIT's layers 0-1 and UltraEdit's 2-3 straddle devices


def test_fake_devices_catch_a_tensor_on_the_wrong_device(tiny):
    model, tok = tiny
    ids = torch.tensor([tok.encode("The capital of France is")])
    expected = model(input_ids=ids).logits
    split = copy.deepcopy(model)
    with FakeDevices() as devices:
        split_model(split, SPLIT)
        logits = split(input_ids=ids.to(input_device(split))).logits
        assert str(logits.device) == "cpu:0" and str(split.lm_head.weight.device) == "cpu:2"
        assert devices.crossings > 0 and torch.equal(logits, expected)  # moves are exact
        # a tensor made on the input device, meeting activations of a block on device 2
        split.model.layers[3].mlp.down_proj.register_forward_hook(lambda _m, _a, out: out + torch.zeros(out.shape[-1], device=input_device(split)))
        with pytest.raises(DeviceMismatch, match="cpu:0 and cpu:2"):
            split(input_ids=ids.to(input_device(split)))


WISE_FAST = ["method.n_iter=2", "method.context_templates=1", "method.template_lengths=[3]"]
CASES = {name: [f"method={name}", *SMALL[name]] for name in METHODS} | {
    "wise_merges": ["method=wise", "method.save_freq=1", "method.merge_freq=2", *WISE_FAST],
    "wise_retrieve_replay": ["method=wise_retrieve", "method.replay=true", "method.save_freq=1", *WISE_FAST],
    "memoir_generation": ["method=memoir", "eval.protocols=[teacher_forced,generation]", *SMALL["memoir"]],
    "grace_single": ["method=grace", "edit_mode=single", *SMALL["grace"]],
    "alphaedit_batch": ["method=alphaedit", "edit_mode=batch", "edit_mode.batch_size=2", *SMALL["alphaedit"]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_method_edits_and_scores_a_model_split_over_devices(compose, data_dir, tmp_path, monkeypatch, case):
    """Edits, merges, a checkpoint and evaluation on a model split over three devices: no op meets
    tensors from two devices, and every score equals the run's on one device."""
    import wise_bench.loop as loop

    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))
    saves = [] if "edit_mode=single" in CASES[case] else ["checkpoint_every=2", "save_edited=true"]
    cfg = compose([f"data_dir={data_dir}", "num_edits=3", "eval_every=2", "eval.batch_size=4", *saves, *CASES[case]])
    on_one = run(cfg, tmp_path / "one")

    real_load = loop.load_model

    def load_split(*args, **kwargs):
        model = real_load(*args, **kwargs)
        split_model(model, SPLIT)
        return model

    monkeypatch.setattr(loop, "load_model", load_split)
    with FakeDevices() as devices:
        run(cfg, tmp_path / "three")
        if saves:  # the saved state, loaded onto the split model
            again = evaluate_saved(tmp_path / "one", cfg, tmp_path / "again")
            assert {k: again[k] for k in ("rel", "gen", "loc")} == {k: on_one[k] for k in ("rel", "gen", "loc")}
    assert devices.crossings > 0
    assert scores(tmp_path / "three") == scores(tmp_path / "one")


def scores(run_dir) -> list[dict]:
    rows = [json.loads(line) for name in ("metrics.jsonl", "samples.jsonl") for line in (run_dir / name).read_text().splitlines()]
    assert len(rows) >= 2 + 3  # the points, and the final scores of the 3 requests
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # all but timings


@pytest.mark.parametrize("name", sorted(n for n, c in METHODS.items() if c.calibrate is not None))
def test_calibration_on_a_model_split_over_devices(compose, data_dir, tiny, monkeypatch, tmp_path, name):
    monkeypatch.setenv("WISE_BENCH_STATS_DIR", str(tmp_path / "stats"))
    model, tok = tiny
    cfg = compose([f"data_dir={data_dir}", "num_edits=3", f"method={name}", *SMALL[name]])
    cls, method_cfg = method_config(cfg)
    dataset = load_dataset(cfg.dataset, data_dir, 3)
    on_one = cls.calibrate(method_cfg, model, EditContext(tok, dataset.train_texts, input_device(model), 0), dataset.requests)
    split = copy.deepcopy(model)
    with FakeDevices() as devices:
        split_model(split, SPLIT)
        on_three = cls.calibrate(method_cfg, split, EditContext(tok, dataset.train_texts, input_device(split), 0), dataset.requests)
    assert devices.crossings > 0 and on_three.values == on_one.values
