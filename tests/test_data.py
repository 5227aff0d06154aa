import json

import pytest
from conftest import COUNTERFACT, HALLUCINATION, TEMPORAL, ZSRE, write_json

from wise_bench.config import DataFormat, DatasetConfig
from wise_bench.data import DataError, load_dataset, read_requests
from wise_bench.errors import UserError


def zsre_cfg(**kw):
    return DatasetConfig(name="zsre", format=DataFormat.zsre, edit_file="zsre/zsre_mend_edit.json",
                         train_file="zsre/zsre_mend_train-1k.json", **kw)


def test_zsre_maps_fields_and_aligns_irrelevant_texts(data_dir):
    ds = load_dataset(zsre_cfg(), data_dir, num_edits=3)
    r = ds.requests[0]
    assert (r.prompt, r.target_new, r.ground_truth) == (ZSRE[0]["src"], "English", "French")
    assert r.rephrase_prompt == ZSRE[0]["rephrase"]
    assert (r.loc_prompt, r.loc_answer, r.subject) == (ZSRE[0]["loc"], "The Beatles", "Danielle Darrieux")
    assert r.portability == ((ZSRE[0]["portability"]["New Question"], "England"),)
    assert ds.requests[1].portability == ()
    assert (r.file, r.index) == (str(data_dir / "zsre/zsre_mend_edit.json"), 0)
    # loc + " " + loc_ans of the train file, by index, cycled (2 train records for 3 edits).
    assert ds.train_texts == [
        "nq question: who wrote hamlet William Shakespeare",
        "nq question: boiling point of water 100 degrees",
        "nq question: who wrote hamlet William Shakespeare",
    ]


def test_train_offset_shifts_the_irrelevant_texts_and_max_records_bounds_the_split(data_dir):
    # A tuning split takes edits and irrelevant texts from one file: request i gets text i + offset.
    ds = load_dataset(zsre_cfg(train_offset=1), data_dir, num_edits=3)
    assert ds.train_texts == [
        "nq question: boiling point of water 100 degrees",
        "nq question: who wrote hamlet William Shakespeare",
        "nq question: boiling point of water 100 degrees",
    ]
    assert len(load_dataset(zsre_cfg(max_records=2), data_dir, num_edits=2).requests) == 2
    with pytest.raises(UserError, match="holds the first 2 records of zsre/zsre_mend_edit.json, but num_edits=3"):
        load_dataset(zsre_cfg(max_records=2), data_dir, num_edits=3)


def test_tuning_splits_never_overlap_the_evaluated_records(compose, shared_data):
    # The tuning splits (dataset=zsre_tune / counterfact_tune) hold other records than the edit sets.
    # ZsRE's train and eval splits share no question; CounterFact shares no case id, but 3 of the
    # 500 tuning prompts are also edit-set prompts of a multi-valued relation (twin city, language)
    # with another true object.
    for tune, evaluated, max_shared in (("zsre_tune", "zsre", 0), ("counterfact_tune", "counterfact_1k", 3)):
        t, e = compose([f"dataset={tune}"]).dataset, compose([f"dataset={evaluated}"]).dataset
        tuned = load_dataset(t, shared_data, t.max_records).requests
        prompts = {r.prompt for r in load_dataset(e, shared_data, 1000).requests}
        assert len(tuned) == 500 and len(prompts & {r.prompt for r in tuned}) == max_shared
    ids = lambda f: {r["case_id"] for r in json.loads((shared_data / f).read_text())}  # noqa: E731
    assert not ids("counterfact/counterfact-train.json") & ids("counterfact/counterfact-edit-1k.json")


def test_train_file_needs_only_its_locality_fields(data_dir):
    # The real zsre train file has a record with an empty 'alt': irrelevant for the x_loc texts.
    assert load_dataset(zsre_cfg(), data_dir, 2).train_texts[0].endswith("William Shakespeare")


@pytest.mark.parametrize(
    "fmt, records, file, check",
    [
        (DataFormat.counterfact, COUNTERFACT, "cf.json",
         lambda r: (r.prompt, r.target_new, r.ground_truth, r.rephrase_prompt, r.loc_answer)
         == (COUNTERFACT[0]["prompt"], "English", "French", COUNTERFACT[0]["rephrase_prompt"], "French")),
        (DataFormat.hallucination, HALLUCINATION, "h.json",
         lambda r: (r.target_new, r.rephrase_prompt, r.loc_prompt) == (HALLUCINATION[0]["target_new"], None, HALLUCINATION[0]["locality_prompt"])),
        (DataFormat.temporal, TEMPORAL, "t.json",
         lambda r: (r.ood_prompt, r.loc_answer) == (TEMPORAL[0]["ood_rephrase"], TEMPORAL[0]["locality_ground_truth"])),
    ],
)
def test_other_formats(tmp_path, fmt, records, file, check):
    reqs = read_requests(write_json(tmp_path / file, records), fmt)
    assert len(reqs) == len(records) and check(reqs[0])


def bad_zsre(tmp_path, mutate):
    records = json.loads(json.dumps(ZSRE))
    mutate(records)
    return write_json(tmp_path / "bad.json", records)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda rs: rs[2].pop("alt"), "record 2, field 'alt': missing required field"),
        (lambda rs: rs[1].update(alt="  "), "record 1, field 'alt': is empty"),
        (lambda rs: rs[3].update(src=42), "record 3, field 'src': expected a string, found int"),
        (lambda rs: rs[0].update(answers=[]), "record 0, field 'answers': expected a non-empty list of strings"),
        (lambda rs: rs[1].update(loc=None), "record 1, field 'loc': missing required field"),
        (lambda rs: rs[0].update(portability="x"), "record 0, field 'portability': expected an object, found str"),
        (lambda rs: rs.__setitem__(2, ["not", "a", "record"]), "record 2: expected a JSON object, found list"),
    ],
)
def test_malformed_records_name_file_record_and_field(tmp_path, mutate, expected):
    path = bad_zsre(tmp_path, mutate)
    with pytest.raises(DataError) as e:
        read_requests(path, DataFormat.zsre)
    assert str(e.value) == f"{path}, {expected}"


def test_invalid_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"src": "a",\n  "alt": }]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 2, column 10"):
        read_requests(path, DataFormat.zsre)


def test_missing_file_explains_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"nope.json: file not found\. Run `python -m wise_bench\.download`"):
        read_requests(tmp_path / "nope.json", DataFormat.zsre)


def test_not_a_list_and_too_few_records(tmp_path):
    with pytest.raises(DataError, match="expected a JSON list of records, found dict"):
        read_requests(write_json(tmp_path / "d.json", {"a": 1}), DataFormat.zsre)
    with pytest.raises(DataError, match="has 4 records but num_edits=5 were asked for"):
        read_requests(write_json(tmp_path / "z.json", ZSRE), DataFormat.zsre, limit=5)


def test_empty_locality_answer_is_allowed_but_other_empty_fields_are_not(tmp_path):
    records = [dict(HALLUCINATION[0], locality_ground_truth="")]
    assert read_requests(write_json(tmp_path / "h.json", records), DataFormat.hallucination)[0].loc_answer == ""
    with pytest.raises(DataError, match="field 'locality_prompt': is empty"):
        read_requests(write_json(tmp_path / "h2.json", [dict(HALLUCINATION[0], locality_prompt="")]), DataFormat.hallucination)


def test_only_the_first_num_edits_records_are_validated(tmp_path):
    path = bad_zsre(tmp_path, lambda rs: rs[3].pop("alt"))
    assert len(read_requests(path, DataFormat.zsre, limit=3)) == 3


@pytest.mark.integration
@pytest.mark.parametrize(
    "fmt, edit, train, n",
    [
        (DataFormat.zsre, "zsre/zsre_mend_edit.json", "zsre/zsre_mend_train-1k.json", 1037),
        (DataFormat.counterfact, "counterfact/counterfact-edit.json", "counterfact/counterfact-train.json", 10000),
        (DataFormat.hallucination, "hallucination/hallucination-edit.json", "hallucination/hallucination-train.json", 600),
        (DataFormat.temporal, "temporal/temporal-edit.json", "temporal/temporal-train.json", 75),
    ],
)
def test_real_files_load_completely(shared_data, fmt, edit, train, n):
    cfg = DatasetConfig(name=fmt.value, format=fmt, edit_file=edit, train_file=train)
    ds = load_dataset(cfg, shared_data, n)
    assert len(ds.requests) == len(ds.train_texts) == n
    assert all(r.prompt and r.target_new and r.loc_prompt for r in ds.requests)
    # Real Hallucination/Temporal files hold a few empty locality answers: kept, scored without Loc.
    assert sum(not r.loc_answer for r in ds.requests) == {"hallucination": 7}.get(fmt.value, 0)
