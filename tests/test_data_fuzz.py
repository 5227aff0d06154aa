"""Fuzzing the data loaders: real-looking records with one random defect each.

Every case must end in one of two ways: a clean load whose requests hold exactly what the file
says, or one ``DataError`` that names the file (and, for a defective record, its index and
field) with no exception chained behind it. Anything else (a ``KeyError``, a ``RecursionError``, a
traceback) is a bug in wise_bench/data.py.

Decisions the cases encode:
- NaN / Infinity / -Infinity (which Python's json reads as floats) are numbers, so in a text field
  they are a wrong type; in a field no loader reads they are harmless.
- A duplicated key keeps its last value, as Python's json and most JSON parsers do: the record
  loads or fails exactly as it would with only the last value.
- Text that is not UTF-8, nesting too deep or a number too long to read are errors of the file.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import COUNTERFACT, HALLUCINATION, TEMPORAL, ZSRE

from wise_bench.config import DataFormat, DatasetConfig
from wise_bench.data import DataError, Request, load_dataset, read_irrelevant_texts, read_requests

SEED = 20240611
CASES_PER_LOADER = 90  # x 4 loaders: ~360 cases, a few seconds in all

RECORDS = {DataFormat.zsre: ZSRE, DataFormat.counterfact: COUNTERFACT,
           DataFormat.hallucination: HALLUCINATION, DataFormat.temporal: TEMPORAL}

# The specification the loaders are held to, written out independently of wise_bench/data.py:
# raw key -> (Request attribute, kind). Keys not listed (e.g. CounterFact's case_id) are not read.
#   text: a non-blank string; may_be_empty: a string; optional: absent, null or a non-blank string;
#   answers: a list whose first entry is a non-blank string; portability: absent, null or an object
#   with non-blank string "New Question" and "New Answer".
LOCALITY = {"locality_prompt": ("loc_prompt", "text"), "locality_ground_truth": ("loc_answer", "may_be_empty")}
SPEC: dict[DataFormat, dict[str, tuple[str, str]]] = {
    DataFormat.zsre: {
        "src": ("prompt", "text"), "alt": ("target_new", "text"), "answers": ("ground_truth", "answers"),
        "rephrase": ("rephrase_prompt", "text"), "loc": ("loc_prompt", "text"), "loc_ans": ("loc_answer", "may_be_empty"),
        "subject": ("subject", "optional"), "portability": ("portability", "portability"),
    },
    DataFormat.counterfact: {
        "prompt": ("prompt", "text"), "target_new": ("target_new", "text"), "ground_truth": ("ground_truth", "optional"),
        "rephrase_prompt": ("rephrase_prompt", "text"), "subject": ("subject", "optional"), **LOCALITY,
    },
    DataFormat.hallucination: {
        "prompt": ("prompt", "text"), "target_new": ("target_new", "text"), "subject": ("subject", "optional"), **LOCALITY,
    },
    DataFormat.temporal: {
        "prompt": ("prompt", "text"), "target_new": ("target_new", "text"), "ood_rephrase": ("ood_prompt", "text"),
        "subject": ("subject", "optional"), **LOCALITY,
    },
}
# A train file is read for its irrelevant texts only: its two locality fields.
TRAIN_SPEC = {fmt: {k: v for k, v in spec.items() if v[0] in ("loc_prompt", "loc_answer")} for fmt, spec in SPEC.items()}

MISSING = object()  # a dropped field
NAN, INF = float("nan"), float("inf")
LONG = "x" * 100_000 + " end"
# Values a field is set to (json.dumps writes the floats as the literals NaN, Infinity, -Infinity).
VALUES: list[Any] = [MISSING, None, 7, -0.5, NAN, INF, -INF, True, "", "   ", LONG, "Ünïcødé 漢字 😀 \u0000 tab\t",
                     [], ["an answer"], [["nested"]], [[[["deep"]]]], ["", "second"], {},
                     {"New Question": "What now?", "New Answer": "this"}, {"New Question": "What now?", "New Answer": 3}]
NOT_A_RECORD: list[Any] = [None, 3, "a record?", NAN, True, [], ["src", "alt"]]
NOT_A_LIST: list[Any] = [{"records": []}, "text", 3, None, NAN, True]
NOT_UTF8 = [b"\xff", b"\xfe\xfe", b"\x80", b"\xc3\x28", b"\xed\xa0\x80"]  # the last: an encoded surrogate


def accepted(kind: str, value: Any) -> bool:
    """Whether a field of this kind holding ``value`` loads."""
    if value is MISSING or value is None:
        return kind in ("optional", "portability", "unread")
    if kind == "unread":
        return True
    if kind == "answers":
        return isinstance(value, list) and bool(value) and isinstance(value[0], str) and bool(value[0].strip())
    if kind == "portability":
        return isinstance(value, dict) and all(isinstance(value.get(k), str) and value[k].strip() for k in ("New Question", "New Answer"))
    if not isinstance(value, str):
        return False
    return kind == "may_be_empty" or bool(value.strip())


def expected_request(fmt: DataFormat, raw: dict, path: Path, index: int) -> Request:
    values: dict[str, Any] = {}
    for key, (attr, kind) in SPEC[fmt].items():
        value = raw.get(key)
        if kind == "answers":
            values[attr] = value[0]
        elif kind == "portability":
            values[attr] = ((value["New Question"], value["New Answer"]),) if value is not None else ()
        else:
            values[attr] = value
    return Request(**values, file=str(path), index=index)


def expected_text(fmt: DataFormat, raw: dict) -> str:
    (prompt_key, _), (answer_key, _) = TRAIN_SPEC[fmt].items()
    return f"{raw[prompt_key]} {raw[answer_key]}".rstrip()


# --- writing files, with defects JSON serialisers will not produce -----------------------------------


class Raw(str):
    """JSON text written into a record as it is (a literal no serialiser would write)."""


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def dump_record(record: dict, duplicate: tuple[str, Any] | None = None) -> str:
    """A record as JSON text; ``duplicate`` = (key, value) writes the key twice, ``value`` first."""
    pairs = [(k, v) for k, v in record.items() if v is not MISSING]
    if duplicate is not None:
        key, first = duplicate
        pairs.insert(0, (key, first))
    return "{" + ", ".join(f"{dump(k)}: {v if isinstance(v, Raw) else dump(v)}" for k, v in pairs) + "}"


def dump_records(records: list, duplicate_at: int | None = None, duplicate: tuple[str, Any] | None = None) -> str:
    return "[" + ", ".join(dump_record(r, duplicate if i == duplicate_at else None) if isinstance(r, dict) else dump(r)
                           for i, r in enumerate(records)) + "]"


# --- cases --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One file with one defect, and what loading it must give."""

    name: str
    fmt: DataFormat
    text: bytes
    records: list | None  # the records as a parser keeping the last duplicate reads them; None: unreadable
    error_at: tuple[int | None, str | None] | None  # (record, field) the error names; (None, None): the file
    loader: str = ""
    limit: int | None = None  # read_requests' limit (num_edits)


def field_case(rng: random.Random, fmt: DataFormat, spec: dict, limit: int | None) -> Case:
    records = [dict(r) for r in RECORDS[fmt]]
    i = rng.randrange(len(records))
    key = rng.choice(sorted(set(records[i]) | set(spec)))
    kind = spec.get(key, ("", "unread"))[1]
    value = rng.choice(VALUES)
    duplicate = None
    if value is not MISSING and rng.random() < 0.25:  # the key written twice: the last value counts
        duplicate = (key, rng.choice([v for v in VALUES if v is not MISSING]))
    written = [dict(r) for r in records]
    written[i][key] = value
    records[i][key] = value
    if value is MISSING:
        del records[i][key]
    checked = limit is None or i < limit
    error_at = None if accepted(kind, value) or not checked else (i, key)
    shown = "LONG" if value is LONG else "MISSING" if value is MISSING else repr(value)[:30]
    name = f"record {i} {key}={shown}" + (f" after a duplicate {repr(duplicate[1])[:20]}" if duplicate else "")
    text = dump_records(written, i if duplicate else None, duplicate).encode()
    return Case(name, fmt, text, records, error_at)


def record_case(rng: random.Random, fmt: DataFormat, limit: int | None) -> Case:
    records: list = [dict(r) for r in RECORDS[fmt]]
    i = rng.randrange(len(records))
    if rng.random() < 0.5:
        records[i] = rng.choice(NOT_A_RECORD)
    else:
        records[i] = [records[i]]  # a record wrapped in a list
    checked = limit is None or i < limit
    return Case(f"record {i} = {repr(records[i])[:30]}", fmt, dump_records(records).encode(), records,
                (i, None) if checked else None)


def file_case(rng: random.Random, fmt: DataFormat) -> Case:
    good = dump_records(RECORDS[fmt]).encode()
    defect = rng.choice(["truncated", "not utf-8", "not a list", "deep nesting", "long number", "empty", "bom"])
    if defect == "truncated":
        cut = rng.randrange(len(good))
        return Case(f"truncated at byte {cut}", fmt, good[:cut], None, (None, None))
    if defect == "not utf-8":
        at, bad = rng.randrange(len(good) + 1), rng.choice(NOT_UTF8)
        return Case(f"bytes {bad!r} at {at}", fmt, good[:at] + bad + good[at:], None, (None, None))
    if defect == "not a list":
        value = rng.choice(NOT_A_LIST)
        return Case(f"top level {value!r}", fmt, dump(value).encode(), None, (None, None))
    records = [dict(r) for r in RECORDS[fmt]]
    key = rng.choice(sorted(records[0]))  # read or not: the file as a whole cannot be parsed
    if defect == "deep nesting":
        records[0][key] = Raw("[" * 100_000 + "]" * 100_000)
    elif defect == "long number":
        records[0][key] = Raw("9" * 100_000)
    else:
        return Case(defect, fmt, b"" if defect == "empty" else "\ufeff".encode() + good, None, (None, None))
    return Case(f"{defect} in {key}", fmt, dump_records(records).encode(), None, (None, None))


def make_cases(loader: str) -> list[Case]:
    rng = random.Random(f"{SEED}-{loader}")
    cases = []
    for _ in range(CASES_PER_LOADER):
        fmt = rng.choice(sorted(RECORDS, key=lambda f: f.value))
        n = len(RECORDS[fmt])
        # read_requests validates only the first `limit` records; the train file is read whole.
        limit = rng.choice([None, rng.randint(1, n)]) if loader == "read_requests" else None
        spec = TRAIN_SPEC[fmt] if loader in ("read_irrelevant_texts", "load_dataset train") else SPEC[fmt]
        draw = rng.random()
        case = field_case(rng, fmt, spec, limit) if draw < 0.65 else record_case(rng, fmt, limit) if draw < 0.8 else file_case(rng, fmt)
        case.name = f"{loader}: {fmt.value} {case.name}" + (f" (limit {limit})" if limit else "")
        case.loader, case.limit = loader, limit
        cases.append(case)
    return cases


LOADERS = ["read_requests", "read_irrelevant_texts", "load_dataset edit", "load_dataset train"]
CASES = [case for loader in LOADERS for case in make_cases(loader)]


def test_the_cases_cover_every_outcome_and_defect():
    errors = [c.error_at for c in CASES if c.error_at is not None]
    assert len(CASES) >= 300
    assert sum(c.error_at is None for c in CASES) >= 50  # clean loads, not only failures
    assert {"field", "record", "file"} <= {"file" if e == (None, None) else "field" if e[1] else "record" for e in errors}
    names = " ".join(c.name for c in CASES)
    for defect in ("MISSING", "=7", "=nan", "=inf", "=None", "=''", "=LONG", "[['nested']]", "{}", "duplicate",
                   "truncated", "bytes", "top level", "deep nesting", "long number"):
        assert defect in names, defect


def load(case: Case, tmp_path: Path) -> tuple[Path, Callable[[], Any]]:
    """(the defective file, a call of the case's loader on it); load_dataset gets it as edit or train file."""
    if case.loader == "read_requests":
        path = tmp_path / "file.json"
        path.write_bytes(case.text)
        return path, lambda: read_requests(path, case.fmt, case.limit)
    if case.loader == "read_irrelevant_texts":
        path = tmp_path / "file.json"
        path.write_bytes(case.text)
        return path, lambda: read_irrelevant_texts(path, case.fmt)
    good = dump_records(RECORDS[case.fmt]).encode()
    defective = "edit.json" if case.loader == "load_dataset edit" else "train.json"
    for name in ("edit.json", "train.json"):
        (tmp_path / name).write_bytes(case.text if name == defective else good)
    cfg = DatasetConfig(name="fuzz", format=case.fmt, edit_file="edit.json", train_file="train.json")
    return tmp_path / defective, lambda: load_dataset(cfg, tmp_path, len(RECORDS[case.fmt]))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name[:120])
def test_a_defective_file_loads_cleanly_or_gives_one_data_error_naming_where(tmp_path, case):
    path, run_loader = load(case, tmp_path)
    try:
        loaded = run_loader()
    except DataError as e:
        message = str(e)
        assert case.error_at is not None, f"rejected a file that should load: {message[:300]}"
        index, key = case.error_at
        where = str(path) + (f", record {index}" if index is not None else "") + (f", field '{key}'" if key else "")
        assert message.startswith(where + ": "), f"expected the error to start with {where!r}: {message[:300]}"
        assert "\n" not in message and len(message) < 500  # one line, not a dump of the file
        assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)  # no traceback behind it
        return
    assert case.error_at is None, f"loaded a file that should fail at {case.error_at}"
    if case.loader == "read_irrelevant_texts":
        assert loaded == [expected_text(case.fmt, r) for r in case.records]
        return
    edited = case.records if case.loader in ("read_requests", "load_dataset edit") else RECORDS[case.fmt]
    n = case.limit or len(edited)
    requests = loaded if case.loader == "read_requests" else loaded.requests
    assert requests == [expected_request(case.fmt, r, tmp_path / ("file.json" if case.loader == "read_requests" else "edit.json"), i)
                        for i, r in enumerate(edited[:n])]
    if case.loader != "read_requests":
        train = case.records if case.loader == "load_dataset train" else RECORDS[case.fmt]
        assert loaded.train_texts == [expected_text(case.fmt, train[i % len(train)]) for i in range(n)]
