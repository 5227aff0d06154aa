"""Benchmark files -> one request type.

Every format is validated record by record; a problem raises ``DataError`` naming the file, the
record index and the field, so that a broken file is reported before any model loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from wise_bench.limits import TokenLimit

from wise_bench.config import DataFormat
from wise_bench.errors import UserError


class DataError(UserError):
    """A user-facing problem with a data file (printed without a traceback)."""

    def __init__(self, file: str | Path, message: str, index: int | None = None, fieldname: str | None = None):
        where = str(file)
        if index is not None:
            where += f", record {index}"
        if fieldname is not None:
            where += f", field '{fieldname}'"
        super().__init__(f"{where}: {message}")


class TooLongError(DataError):
    """A text over ``model.max_length`` tokens (skippable with ``data.on_too_long=skip``)."""


@dataclass(frozen=True)
class Request:
    prompt: str
    target_new: str
    loc_prompt: str
    loc_answer: str
    ground_truth: str | None = None
    rephrase_prompt: str | None = None
    subject: str | None = None
    ood_prompt: str | None = None  # Temporal: out-of-distribution rephrase of the prompt
    portability: tuple[tuple[str, str], ...] = ()  # (question, answer) pairs
    file: str = ""
    index: int = -1


@dataclass
class EditDataset:
    name: str
    requests: list[Request]
    # "Irrelevant" texts x_i (loc + " " + loc_ans of the train file), aligned with requests by index.
    train_texts: list[str] = field(default_factory=list)
    # data.on_too_long=skip: "file, record i" of each record left out for a text over the limit.
    skipped_too_long: list[str] = field(default_factory=list)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(
            path,
            "file not found. Run `python -m wise_bench.download` (needs internet) or point "
            "data_dir / WISE_BENCH_DATA_DIR at a directory holding the benchmark files.",
        )
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:  # json recurses once per nested list or object
        raise DataError(path, "invalid JSON: nested too deeply to read") from None
    except ValueError as e:  # valid JSON Python will not read: an integer over sys.get_int_max_str_digits() digits
        raise DataError(path, f"invalid JSON: {e}") from None
    if not isinstance(records, list):
        raise DataError(path, f"expected a JSON list of records, found {type(records).__name__}")
    return records


class _Record:
    """Typed access to one raw record, raising DataError with its location."""

    def __init__(self, path: Path, index: int, raw: Any):
        self.path, self.index, self.raw = path, index, raw
        if not isinstance(raw, dict):
            raise DataError(path, f"expected a JSON object, found {type(raw).__name__}", index)

    def error(self, fieldname: str, message: str) -> DataError:
        return DataError(self.path, message, self.index, fieldname)

    def text(self, key: str, required: bool = True, allow_empty: bool = False) -> str | None:
        if key not in self.raw or self.raw[key] is None:
            if required:
                raise self.error(key, "missing required field")
            return None
        value = self.raw[key]
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, found {type(value).__name__}")
        if not value.strip() and not allow_empty:
            raise self.error(key, "is empty")
        return value

    def first_of_list(self, key: str) -> str:
        value = self.raw.get(key)
        if value is None:
            raise self.error(key, "missing required field")
        if not isinstance(value, list) or not value:
            raise self.error(key, "expected a non-empty list of strings")
        if not isinstance(value[0], str) or not value[0].strip():
            raise self.error(key, "first entry must be a non-empty string")
        return value[0]


# Request attribute -> the field that holds it in each format's raw records.
FIELDS: dict[DataFormat, dict[str, str]] = {
    DataFormat.zsre: dict(
        prompt="src", target_new="alt", ground_truth="answers", rephrase_prompt="rephrase",
        loc_prompt="loc", loc_answer="loc_ans", subject="subject", portability="portability",
    ),
    DataFormat.counterfact: dict(
        prompt="prompt", target_new="target_new", ground_truth="ground_truth", rephrase_prompt="rephrase_prompt",
        loc_prompt="locality_prompt", loc_answer="locality_ground_truth", subject="subject",
    ),
    DataFormat.hallucination: dict(
        prompt="prompt", target_new="target_new", loc_prompt="locality_prompt",
        loc_answer="locality_ground_truth", subject="subject",
    ),
    DataFormat.temporal: dict(
        prompt="prompt", target_new="target_new", ood_prompt="ood_rephrase", loc_prompt="locality_prompt",
        loc_answer="locality_ground_truth", subject="subject",
    ),
}
OPTIONAL = {"subject", "ground_truth", "portability"}
# Present but possibly empty: some real Hallucination/Temporal records have an empty locality
# answer; such a request simply has no locality score.
MAY_BE_EMPTY = {"loc_answer"}


def _parse(r: _Record, fmt: DataFormat) -> Request:
    values: dict[str, Any] = {}
    for attr, key in FIELDS[fmt].items():
        if key == "answers":  # ZsRE: the true answer is the first of a list
            values[attr] = r.first_of_list(key)
        elif key == "portability":
            values[attr] = _zsre_portability(r, key)
        else:
            values[attr] = r.text(key, required=attr not in OPTIONAL, allow_empty=attr in MAY_BE_EMPTY)
    return Request(**values, file=str(r.path), index=r.index)


def _zsre_portability(r: _Record, key: str) -> tuple[tuple[str, str], ...]:
    port = r.raw.get(key)
    if port is None:
        return ()
    if not isinstance(port, dict):
        raise r.error(key, f"expected an object, found {type(port).__name__}")
    q, a = port.get("New Question"), port.get("New Answer")
    if not (isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip()):
        raise r.error(key, "needs non-empty strings 'New Question' and 'New Answer'")
    return ((q, a),)


def field_error(fmt: DataFormat, req: Request, attr: str, message: str) -> DataError:
    """A DataError about one of ``req``'s fields, named as the raw file names it."""
    return DataError(req.file, message, req.index, FIELDS[DataFormat(fmt)].get(attr, attr))


def _requests(path: Path, records: list, fmt: DataFormat) -> Iterator[Request]:
    """The raw records of a benchmark file as requests, each validated as it is reached."""
    fmt = DataFormat(fmt)
    for i, raw in enumerate(records):
        yield _parse(_Record(path, i, raw), fmt)


def _enough(path: Path, records: list, wanted: int | None) -> None:
    if wanted is not None and wanted > len(records):
        raise DataError(path, f"has {len(records)} records but num_edits={wanted} were asked for")


def read_requests(path: Path, fmt: DataFormat, limit: int | None = None) -> list[Request]:
    """Parse and validate the first ``limit`` records (all when None) of a benchmark file."""
    records = _read_records(path)
    _enough(path, records, limit)
    return list(_requests(path, records[:limit], fmt))


def load_dataset(cfg, data_dir: str | Path, num_edits: int, limit: "TokenLimit | None" = None,
                 skip_too_long: bool = False) -> EditDataset:
    """The first ``num_edits`` requests of ``cfg.edit_file`` and the aligned irrelevant texts.

    With a token ``limit``, a record holding a text over it raises ``TooLongError``, or, with
    ``skip_too_long``, is left out and the next record takes its place (likewise irrelevant texts).
    """
    data_dir = Path(data_dir)
    path = data_dir / cfg.edit_file
    if cfg.max_records is not None and num_edits > cfg.max_records:
        raise UserError(f"dataset={cfg.name} holds the first {cfg.max_records} records of {cfg.edit_file}, "
                        f"but num_edits={num_edits} were asked for")
    records = _read_records(path)
    _enough(path, records, num_edits)
    requests: list[Request] = []
    skipped: list[str] = []
    for req in _requests(path, records[:cfg.max_records], cfg.format):
        if len(requests) == num_edits:
            break
        over = limit.request(req) if limit is not None else None
        if over is None:
            requests.append(req)
            continue
        attr, n, counted = over
        if not skip_too_long:
            raise TooLongError(req.file, f"{counted} is {n} tokens, over model.max_length={limit.max_length} "
                               "(data.on_too_long=skip leaves such records out)",
                               req.index, FIELDS[DataFormat(cfg.format)].get(attr, attr))
        skipped.append(f"{req.file}, record {req.index}")
    if len(requests) < num_edits:
        raise DataError(path, f"only {len(requests)} records fit model.max_length ({len(skipped)} too long), "
                        f"but num_edits={num_edits} were asked for")
    train_texts: list[str] = []
    if cfg.train_file:
        train = read_irrelevant_texts(data_dir / cfg.train_file, cfg.format, limit, skip_too_long)
        # Cycled when shorter than the edit stream (WISE spec).
        train_texts = [train[(i + cfg.train_offset) % len(train)] for i in range(len(requests))]
    return EditDataset(name=cfg.name, requests=requests, train_texts=train_texts, skipped_too_long=skipped)


def read_irrelevant_texts(path: Path, fmt: DataFormat, limit: "TokenLimit | None" = None,
                          skip_too_long: bool = False) -> list[str]:
    """``loc + " " + loc_ans`` of every record of a train file (only those fields must be valid);
    with a token ``limit``, a text over it raises ``TooLongError`` or, with ``skip_too_long``, is left out."""
    fields = FIELDS[DataFormat(fmt)]
    texts = []
    for i, raw in enumerate(_read_records(path)):
        r = _Record(path, i, raw)
        text = f"{r.text(fields['loc_prompt'])} {r.text(fields['loc_answer'], allow_empty=True)}".rstrip()
        n = limit.text(text) if limit is not None else None
        if n is not None and not skip_too_long:
            raise TooLongError(path, f"loc + loc_ans is {n} tokens, over model.max_length={limit.max_length}",
                               i, fields["loc_prompt"])
        if n is None:
            texts.append(text)
    if not texts:
        raise DataError(path, "has no records" + (" that fit model.max_length" if limit is not None else ""))
    return texts
