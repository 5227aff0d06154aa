"""scripts/gpu_check.py: its CPU smoke mode runs every model × method on the scaled-down shapes and
writes figures beside the memory model's prediction."""
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, load_script

MODELS = ("llama-2-7b", "mistral-7b", "llama-3-8b-instruct")
METHODS = ("wise", "grace", "ft_m", "alphaedit", "memoir", "ultraedit")
SMALL_RUN = ["--edits", "2", "--turn", "3", "--eval-requests", "4", "--generation-requests", "2"]


@pytest.fixture(scope="module")
def gpu_check():
    yield load_script("gpu_check")
    del sys.modules["gpu_check"]


def test_the_smoke_mode_measures_every_model_and_method(data_dir, tmp_path):
    out = tmp_path / "smoke.json"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out),
                          "--data-dir", str(data_dir), "--stats-dir", str(tmp_path / "stats"), *SMALL_RUN],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["device"], result["smoke"], result["skipped"]) == ("cpu", True, [])
    assert set(result["models"]) == set(MODELS)
    for name, model in result["models"].items():
        # The memory model's weights term is the smoke model's real parameter bytes.
        assert model["weights_bytes_predicted"] == model["weights_bytes_measured"] > 0
        assert model["shape"]["num_hidden_layers"] == 4 and model["shape"]["hidden_size"] == 64
        assert set(model["methods"]) == set(METHODS)
        for method, row in model["methods"].items():
            assert math.isfinite(row["s_per_edit_median"]) and row["s_per_edit_median"] > 0, (name, method)
            assert row["eval_req_per_s"] > 0 and row["generation_req_per_s"] > 0
            assert row["peak_bytes"] is None and row["peak_over_predicted"] is None  # no allocator figures on CPU
            prediction = row["prediction"]
            assert prediction["weights"] == model["weights_bytes_measured"]
            assert row["predicted_peak_bytes"] == prediction["peak"] > prediction["weights"]
            assert all(layer.startswith("model.layers[") for layer in row["layers"])
        methods = model["methods"]
        assert methods["ultraedit"]["requests_per_step"] == 3 and methods["ultraedit"]["edit_steps"] == 1
        assert methods["wise"]["requests_per_step"] == 1 and methods["wise"]["edit_steps"] == 2
        # Layer 27 of 32 is block 3 of 4; AlphaEdit's layers 4-8 collapse onto blocks 0 and 1.
        assert methods["wise"]["layers"] == ["model.layers[3].mlp.down_proj"]
        assert methods["alphaedit"]["layers"] == ["model.layers[0].mlp.down_proj", "model.layers[1].mlp.down_proj"]
    assert "llama-3-8b-instruct wise" in " ".join(res.stdout.split())


def test_layer_indices_map_proportionally_and_stay_distinct(gpu_check):
    layers = {"wise": "model.layers[29].mlp.down_proj",
              "ultraedit": [f"model.layers[{i}].mlp.gate_proj" for i in range(11, 16)]
              + [f"model.layers[{i}].mlp.up_proj" for i in range(18, 25)]}
    assert gpu_check.smoke_edit_layers(layers, 32) == {
        "wise": "model.layers[3].mlp.down_proj",
        "ultraedit": ["model.layers[1].mlp.gate_proj", "model.layers[2].mlp.up_proj", "model.layers[3].mlp.up_proj"]}


def test_the_prediction_table_says_which_card_fits(gpu_check, data_dir, capsys):
    gpu_check.main(["--predict", "1000", "--models", "llama-2-7b", "--methods", "wise", "alphaedit",
                    "--data-dir", str(data_dir), *SMALL_RUN])
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| llama-2-7b")}
    # LLaMA-2-7B in bf16 is 12.55 GiB of weights; WISE adds little, AlphaEdit its d_ff × d_ff statistics.
    assert rows["wise"][-3:] == ["yes", "yes", "yes"] and 12.55 < float(rows["wise"][2]) < 16
    assert rows["alphaedit"][-3:] == ["no", "yes", "yes"]


def test_counts_below_one_are_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--edits", "0"])
