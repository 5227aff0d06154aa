"""Every method: an edit changes what the model computes, and restore() gives back the unedited
model bit for bit (weights, modules, hooks and outputs).

A restore test that never checks the edit did something passes for an edit that is a no-op; so
the edited outputs must first differ from the unedited ones.
"""
import pytest
import torch

from wise_bench.data import Request
from wise_bench.loop import method_config
from wise_bench.methods import METHODS, EditContext
from wise_bench.metrics import TokenBatch, encode_pair

REQUEST = Request(prompt="The capital of Atlantis is", target_new="Zor", subject="Atlantis", loc_prompt="nq question: sky",
                  loc_answer="blue", rephrase_prompt="Atlantis has its capital in", index=0)
TRAIN = [f"nq question: who wrote book number {i} about {w}" for i, w in enumerate(["rivers", "kings", "stars", "cats", "maps"])]
# What the model is read on: the edit itself, its paraphrase and an unrelated text.
PROBE = [(REQUEST.prompt, REQUEST.target_new), (REQUEST.rephrase_prompt, REQUEST.target_new), (REQUEST.loc_prompt, REQUEST.loc_answer)]

LOCATE = ["method.context_templates=1", "method.context_template_length=3", "method.v_steps=3", "method.mom2_dataset=train_texts"]
WISE = ["method.n_iter=3", "method.context_templates=1", "method.template_lengths=[3]"]
# Few steps, and learning rates large enough for the tiny random model's small activations to move.
SMALL = {
    "ft_l": ["method.steps=2", "method.lr=3e-2"], "ft_m": ["method.steps=2", "method.lr=3e-2"],
    "ft_ewc": ["method.steps=2", "method.lr=3e-2"], "grace": ["method.n_iter=2"],
    "defer": ["method.steps=2", "method.lr=3e-2"], "wise": WISE, "wise_retrieve": WISE,
    "rome": LOCATE, "memit": LOCATE, "alphaedit": LOCATE,
    "memoir": ["method.n_iter=3", "method.context_templates=1", "method.template_lengths=[3]", "method.edit_lr=3.0"],
    "ultraedit": ["method.lr=1e-2"],  # the default 1e-6 assumes widths in the thousands
}


def probe_logits(model, tok) -> torch.Tensor:
    batch = TokenBatch.build([encode_pair(tok, p, t) for p, t in PROBE], tok.pad_token_id, "cpu")
    with torch.no_grad():
        return batch.logits(model)


def hooks(model) -> list:
    return [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks]


def test_every_method_is_covered():
    assert set(SMALL) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_edit_changes_the_outputs_and_restore_gives_back_the_model_bit_for_bit(tiny, compose, tmp_path, name):
    model, tok = tiny
    overrides = [f"method={name}", *SMALL[name]]
    if SMALL[name] is LOCATE:
        overrides.append(f"method.stats_dir={tmp_path}")
    cls, cfg = method_config(compose(overrides))
    modules = [(n, id(m)) for n, m in model.named_modules()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    unedited = probe_logits(model, tok)
    method = cls(cfg, model, EditContext(tok, TRAIN, torch.device("cpu"), 0))
    try:
        method.edit([REQUEST])
        edited = probe_logits(model, tok)
        assert not torch.equal(edited, unedited), "the edit left every output as it was"
    finally:
        method.restore()
    assert [(n, id(m)) for n, m in model.named_modules()] == modules  # same module objects, wrappers gone
    assert hooks(model) == []
    restored = model.state_dict()
    assert restored.keys() == weights.keys()
    changed = [k for k, v in restored.items() if not torch.equal(v, weights[k])]
    assert changed == []
    assert torch.equal(probe_logits(model, tok), unedited)
