"""scripts/probe_recall_pathway.py: the key positions it probes, and one probe on a tiny model."""
import sys

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def probe_script():
    yield load_script("probe_recall_pathway")
    del sys.modules["probe_recall_pathway"]


def test_positions_counted_by_hand_on_a_byte_level_tokenizer(probe_script, tiny):
    _, tok = tiny  # one token per byte, after <s> at position 0
    at_end = probe_script.subject_positions(tok, "Who founded Apple?", "Apple")
    # "Who founded " is 12 bytes: "A" at 1 + 12 = 13, "e" at 17, "?" at 18
    assert at_end == {"subject_first": 13, "subject_last": 17, "all_subject": [13, 14, 15, 16, 17],
                      "after_subject": 18, "prompt_last": 18}
    at_start = probe_script.subject_positions(tok, "Rhine flows into", "Rhine")
    assert at_start["subject_first"] == 1 and at_start["subject_last"] == 5 and at_start["prompt_last"] == 16


def test_a_delta_moves_the_answer_only_from_where_it_can_reach_it(probe_script, tiny):
    """After the last block, position i's hidden state feeds only position i's logits: a δ at <s>
    cannot touch the target, a δ at the prompt's last token sets the first target token."""
    model, tok = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.config.num_hidden_layers - 1
    before, unmoved, _ = probe_script.probe(model, tok, "Who founded Apple?", "Bill", layer=last, pos=0, steps=10, lr=0.5)
    assert unmoved == before
    before, after, accuracy = probe_script.probe(model, tok, "Who founded Apple?", "Bill", layer=last, pos=18, steps=30, lr=0.5)
    assert after < before - 0.1 and accuracy >= 0.2  # " Bill": 5 tokens, the first set by δ (random logits are flat)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # only δ was trained
