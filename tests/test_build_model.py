"""scripts/build_model.py: the corpus levers of candidate C (invented relations per subject, profiles)."""
import random
import sys

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def build():
    yield load_script("build_model")
    del sys.modules["build_model"]


TEMPLATES = {"P103": ["{} is a native speaker of", "The mother tongue of {} is"],
             "P17": ["{} is located in the country of", "{}, in"],
             "P641": ["{} plays the sport", "Which sport does {} play?"],
             "P27": ["{} is a citizen of"]}
POOLS = {"P103": ["French", "Dutch"], "P17": ["Italy", "Japan"], "P641": ["tennis", "soccer"], "P27": ["Spain"]}


def test_invented_relations_are_subject_first_distinct_and_never_an_edit_target(build):
    forbidden = {"Rhine": {"Italy"}}
    facts = build.subject_relations(["Rhine", "Apple"], TEMPLATES, POOLS, 3, forbidden, random.Random(0))
    assert [f[2] for f in facts] == ["Rhine"] * 3 + ["Apple"] * 3
    for statement, answer, subject in facts:
        relation = next(r for r, ts in TEMPLATES.items() if statement in [t.replace("{}", subject) for t in ts])
        assert statement.startswith(subject) and "?" not in statement  # only the subject-first templates
        assert answer in POOLS[relation]
    rhine = {next(r for r, ts in TEMPLATES.items() if s in [t.replace("{}", "Rhine") for t in ts]) for s, _, _ in facts[:3]}
    assert len(rhine) == 3  # three different relations for one subject
    assert all(a != "Italy" for _, a, s in facts if s == "Rhine")  # forbidden for Rhine, not for Apple


def test_profiles_read_a_fact_after_all_of_its_subjects_other_facts(build):
    Fact = build.Fact
    facts = [Fact("Rhine flows into", "North Sea", "a", "Rhine"), Fact("Rhine is a native speaker of", "Dutch", "b", "Rhine"),
             Fact("Rhine plays the sport", "tennis", "b", "Rhine"), Fact("Who wrote Hamlet?", "Shakespeare", "c", "Hamlet"),
             Fact("nq question: capital of peru", "Lima", "loc")]
    out = build.epoch_facts(facts, prefix_prob=0.0, profile_prob=1.0, rng=random.Random(3))
    first = out[0]
    assert first.prompt.endswith(". Rhine flows into") and first.answer == "North Sea"
    prefix = first.prompt[: -len("Rhine flows into")]
    assert sorted(prefix.split(". ")) == ["", "Rhine is a native speaker of Dutch", "Rhine plays the sport tennis"]
    # a subject with one fact, and a fact without a subject, stay as they are
    assert out[3] == facts[3] and out[4] == facts[4]
    assert build.epoch_facts(facts, 0.0, 0.0, random.Random(0)) is facts


def test_an_unknown_corpus_group_is_refused_by_name(build, shared_data):
    args = build.parse_args(["--data-dir", str(shared_data), "--groups", "zsre_tune_src", "zsre_tune_lco"])
    with pytest.raises(SystemExit, match=r"unknown group\(s\) \['zsre_tune_lco'\]"):
        build.build_corpus(args.data_dir, args)
