#!/usr/bin/env python
"""Download the wise-bench benchmark data and verify it against known SHA256 digests.

Usage::

    python scripts/get_data.py [--dest DIR] [--only zsre,hallucination,temporal,counterfact]
                               [--force] [--list] [--extra] [--base-url URL] [--timeout S]

Files land in DEST (default: ``$WISE_BENCH_DATA_DIR``, else ``<repo>/data``) with the layout::

    zsre/         zsre_mend_edit.json, zsre_mend_train-1k.json, zsre_inverse_relation.json,
                  zsre_subject_replace.json
    hallucination/ hallucination-edit.json, hallucination-train.json
    temporal/     temporal-edit.json, temporal-train.json
    counterfact/  counterfact-edit.json, counterfact-train.json, counterfact-edit-1k.json,
                  counterfact_portability_gpt4.json, counterfact_subject_replace.json,
                  counterfact_with_story_prompts.json, counterfact_with_dependancies_sample.json,
                  DERIVED_counterfact_rome_format_subset_1476.json

Every file is checked against the SHA256 table below; a file that is already present with the
right digest is not downloaded again. Each download goes to a temporary file next to its
destination and is renamed into place only once its digest is right, so a failed or corrupted
download never leaves a file at the destination.

``DERIVED_counterfact_rome_format_subset_1476.json`` has no public copy: it is rebuilt locally
from the four ROME-format CounterFact subsets (see ``derive_counterfact_rome_subset``), and the
result is verified against its digest like every other file.

Sources are raw files of public GitHub repositories pinned to a commit. When several sources are
listed for one file they are tried in order; the digest decides which one is accepted.
``--base-url URL`` (or ``WISE_BENCH_DATA_URL``) replaces them all with ``URL/<relative path>``
(a mirror laid out like DEST; ``file://`` URLs work too).

Exit codes: 0 everything present and verified; 1 some file could not be obtained or failed its
checksum; 2 the machine appears to be offline (or bad arguments).

Only the standard library is needed; tqdm, when installed, draws a progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

try:  # optional progress bar
    from tqdm import tqdm as _tqdm
except Exception:  # pragma: no cover - tqdm is optional
    _tqdm = None

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_DATA_DIR = "WISE_BENCH_DATA_DIR"
ENV_BASE_URL = "WISE_BENCH_DATA_URL"
DEFAULT_TIMEOUT = 30.0  # seconds, per connection attempt / socket read
CHUNK = 1 << 16
USER_AGENT = "wise-bench-get-data/1.0 (+python urllib)"
GROUPS = ("zsre", "hallucination", "temporal", "counterfact")

# --------------------------------------------------------------------------------------------
# Public sources
# --------------------------------------------------------------------------------------------
# (owner/repo, commit). Full 40-hex SHAs were resolved from stored copies of the repositories;
# two commits named in the data README could only be found abbreviated (noted below):
# they are requested as given (raw.githubusercontent.com may not resolve an abbreviated SHA),
# after a full-SHA source whose file has the same length and ending as ours (the digest decides).
REPOS: dict[str, tuple[str, str]] = {
    # WISE release files (same blobs as fasdkljfds/EasyEdit). zsre_mend_edit.json is stored
    # there with Git LFS: the raw URL returns a pointer, and download() then follows the
    # pointer to media.githubusercontent.com (the pointer's oid equals our digest).
    "repair": ("sci-m-wang/REPAIR", "ab1b995c8ca61719a9dc238a81bb019e0f1baae7"),
    # Commit named in the data README; ONLY THE ABBREVIATED SHA IS KNOWN (full one unresolved).
    "easyedit_wise": ("fasdkljfds/EasyEdit", "e7880657"),
    # Commit named in the data README; ONLY THE ABBREVIATED SHA IS KNOWN (full one unresolved).
    "knowledgespread": ("Jometeorie/KnowledgeSpread", "bdf8bc15"),
    # Another commit of the same repository whose data/ files match ours in length and ending.
    "knowledgespread_d1a8": ("Jometeorie/KnowledgeSpread",
                             "d1a8d1ed5367e66010d4d9b081ab388b46c2438c"),
    # Full SHA resolved. The README gives only the folder "dataset/"; the exact sub-paths of the
    # portability files in this repository could not be confirmed, so a few candidate paths
    # are tried (all at this pinned commit; the digest rejects anything else).
    "leonz": ("leonz-z/EasyEdit", "5d49c472bd4b8447a70d276fb577d28088588e62"),
    "longform": ("domenicrosati/longform_edit_model_evals",
                 "4ebb3790883d2100ed917c1cc9acd285e76aa52c"),
    # An earlier commit of the same repository (story-prompts file of the same length).
    "longform_87602d8": ("domenicrosati/longform_edit_model_evals",
                         "87602d8eca1590362317864800d3948df4946821"),
}

# Official WISE download (Google Drive archive with ZsRE/, hallucination/ and temporal/). Not
# fetched automatically (Drive needs an interactive confirmation for large files); listed here
# and by --list for users who prefer it. Its files are the ones checked below.
WISE_DRIVE_FILE_ID = "1YtQvv4WvTa4rJyDYQR2J-uK8rnrt0kTA"
WISE_DRIVE_URL = f"https://drive.google.com/file/d/{WISE_DRIVE_FILE_ID}/view"


def gh(repo_key: str, path: str) -> str:
    """Raw-file URL of ``path`` in the pinned commit of ``REPOS[repo_key]``."""
    repo, commit = REPOS[repo_key]
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{urllib.parse.quote(path)}"


@dataclass(frozen=True)
class DataFile:
    """One verified benchmark file: path relative to DEST, its SHA256, where to get it."""

    rel: str
    sha256: str
    sources: tuple[str, ...] = ()
    derive: str | None = None  # name of a local derivation (key of DERIVATIONS)

    @property
    def group(self) -> str:
        return self.rel.split("/", 1)[0]


@dataclass(frozen=True)
class ExtraFile:
    """A larger public file with no digest in our table (downloaded only with --extra)."""

    rel: str
    sources: tuple[str, ...]
    note: str
    reference_sha256: str | None = None  # published elsewhere (e.g. a Git LFS oid); informative

    @property
    def group(self) -> str:
        return self.rel.split("/", 1)[0]


def _leonz(rel: str) -> tuple[str, ...]:
    """Candidate paths for a file of leonz-z/EasyEdit (sub-folder under dataset/ unconfirmed)."""
    name = rel.split("/", 1)[1]
    easyedit_layout = {
        "zsre_inverse_relation.json": "portability/Inverse Relation/",
        "zsre_subject_replace.json": "portability/Subject Replace/",
        "counterfact_subject_replace.json": "portability/Subject Replace/",
        "counterfact_portability_gpt4.json": "portability/One Hop/",
        "counterfact-edit.json": "counterfact/",
        "counterfact-train.json": "counterfact/",
    }
    paths = [f"dataset/{rel}", f"dataset/{name}"]
    if name in easyedit_layout:
        paths.append(f"dataset/{easyedit_layout[name]}{name}")
    return tuple(gh("leonz", p) for p in dict.fromkeys(paths))


DERIVED_CF = "counterfact/DERIVED_counterfact_rome_format_subset_1476.json"

# SHA256 digests, copied from the SHA256SUMS file of the project's data release.
FILES: list[DataFile] = [
    # --- zsre -------------------------------------------------------------------------------
    DataFile(
        "zsre/zsre_mend_edit.json",
        "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
        (gh("repair", "data/wise/ZsRE/zsre_mend_edit.json"),
         gh("easyedit_wise", "data/wise/ZsRE/zsre_mend_edit.json")),
    ),
    DataFile(
        "zsre/zsre_mend_train-1k.json",
        "09dbb446f4afa1e500e051806430d286ef260fa6dd89e3590a9756f8b060a229",
        (gh("knowledgespread_d1a8", "data/zsre/zsre_mend_train-1k.json"),
         gh("knowledgespread", "data/zsre/zsre_mend_train-1k.json")),
    ),
    DataFile(
        "zsre/zsre_inverse_relation.json",
        "34d07e57e0b8273f9418eb1925c38ba0294d94b986f5b291df41d968b0fe06e3",
        _leonz("zsre/zsre_inverse_relation.json"),
    ),
    DataFile(
        "zsre/zsre_subject_replace.json",
        "bcb6d394b390329828898799220916ebc0ae95617c8c94fc60bf527692e41740",
        _leonz("zsre/zsre_subject_replace.json"),
    ),
    # --- hallucination ----------------------------------------------------------------------
    DataFile(
        "hallucination/hallucination-edit.json",
        "523ce88b5299047bf58ea3ad8b7e9d12635592543df54b58c8eaf16d5e68aaaf",
        (gh("repair", "data/wise/hallucination/hallucination-edit.json"),
         gh("easyedit_wise", "data/wise/hallucination/hallucination-edit.json")),
    ),
    DataFile(
        "hallucination/hallucination-train.json",
        "ef280a0ce9aa194c545e7a1c7983df181b8e48dbfb1945ffe40e1903cca0d297",
        (gh("repair", "data/wise/hallucination/hallucination-train.json"),
         gh("easyedit_wise", "data/wise/hallucination/hallucination-train.json")),
    ),
    # --- temporal ---------------------------------------------------------------------------
    DataFile(
        "temporal/temporal-edit.json",
        "3c27956224d56111762e7b56ca0595dc638cc005faaf322a01c48ecd5283aef8",
        (gh("repair", "data/wise/temporal/temporal-edit.json"),
         gh("easyedit_wise", "data/wise/temporal/temporal-edit.json")),
    ),
    DataFile(
        "temporal/temporal-train.json",
        "0ba8c40de49bd0d0ffc1da69ac17fcfce6db8c32bf36a7df5c88730b48e1172a",
        (gh("repair", "data/wise/temporal/temporal-train.json"),
         gh("easyedit_wise", "data/wise/temporal/temporal-train.json")),
    ),
    # --- counterfact ------------------------------------------------------------------------
    DataFile(
        "counterfact/counterfact-edit.json",
        "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
        (gh("knowledgespread_d1a8", "data/counterfact/counterfact-edit.json"),)
        + _leonz("counterfact/counterfact-edit.json"),
    ),
    DataFile(
        "counterfact/counterfact-train.json",
        "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
        (gh("knowledgespread_d1a8", "data/counterfact/counterfact-train.json"),)
        + _leonz("counterfact/counterfact-train.json"),
    ),
    DataFile(
        "counterfact/counterfact-edit-1k.json",
        "39ffb00c9468d833b8594668b218b07590e85aa6332f667cf5ccf1bf1b576384",
        (gh("knowledgespread_d1a8", "data/counterfact/counterfact-edit-1k.json"),
         gh("knowledgespread", "data/counterfact/counterfact-edit-1k.json")),
    ),
    DataFile(
        "counterfact/counterfact_portability_gpt4.json",
        "fac215b31d9481a33e055ac85145d1d711217dfd20ad3c45e61fc2d6b540c5ed",
        _leonz("counterfact/counterfact_portability_gpt4.json"),
    ),
    DataFile(
        "counterfact/counterfact_subject_replace.json",
        "36a81b8dd513680743347d94acd00fd5f3e25baafbe6ebe951e16ff0f36f9b9d",
        _leonz("counterfact/counterfact_subject_replace.json"),
    ),
    DataFile(
        "counterfact/counterfact_with_story_prompts.json",
        "98a6975bca0ea14e692416ccac80a412d15d1110cab661b743a596684542a56b",
        (gh("longform", "data/counterfact_with_story_prompts.json"),
         gh("longform_87602d8", "data/counterfact_with_story_prompts.json")),
    ),
    DataFile(
        "counterfact/counterfact_with_dependancies_sample.json",
        "fbaf34eda6ad08aba95325889c0a6c7c1cc8be1299b7d446d7d1a24c09e6f514",
        (gh("longform", "data/counterfact_with_dependancies_sample.json"),),
    ),
    # Built locally from the four subsets above (which must therefore come first).
    DataFile(
        DERIVED_CF,
        "d4ee9ce5797bcaabd17a4999dbf1d2ab5122754b29f7bce99f15bb2b6682b904",
        (),
        derive="counterfact_rome_subset",
    ),
]

# Larger files that are not part of the verified release. No digest in our table: they are
# fetched only with --extra and reported as unverified.
EXTRA_FILES: list[ExtraFile] = [
    ExtraFile(
        "zsre/zsre_mend_eval.json",
        ("https://rome.baulab.info/data/dsets/zsre_mend_eval.json",
         gh("repair", "data/wise/ZsRE/zsre_mend_eval.json")),
        "full ZsRE (MEND split) evaluation set, 19,086 records (ROME's copy)",
        # Git LFS oid (= SHA256 of the content) of sci-m-wang/REPAIR's copy at the commit above.
        reference_sha256="8a371d512f8a6ab175db4ef672181d5c0e52da23298cb51e5a2eeea2f89aa9cd",
    ),
    ExtraFile(
        "zsre/zsre_mend_train.json",
        ("https://rome.baulab.info/data/dsets/zsre_mend_train.json",
         gh("repair", "data/wise/ZsRE/zsre_mend_train.json")),
        "full ZsRE (MEND split) training set",
        reference_sha256="4f3ac245e9c0baaf633f9e6cb765ffa8e83d594a74520a6cc3539497328c0722",
    ),
    ExtraFile(
        "counterfact/counterfact.json",
        ("https://rome.baulab.info/data/dsets/counterfact.json",),
        "ROME's full CounterFact, 21,919 records (nested ROME format)",
    ),
    ExtraFile(
        "counterfact/multi_counterfact.json",
        ("https://memit.baulab.info/data/dsets/multi_counterfact.json",),
        "MEMIT's MultiCounterFact (nested ROME format)",
    ),
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class NetworkError(Exception):
    """The host could not be reached (DNS failure, refused connection, timeout, ...)."""

    def __init__(self, url: str, reason: object):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class NotFoundError(Exception):
    """The server answered, but not with the file (HTTP error status, missing file:// path)."""


class ChecksumMismatch(Exception):
    def __init__(self, url: str, expected: str, actual: str):
        super().__init__(f"{url}: expected sha256 {expected}, got {actual}")
        self.url = url
        self.expected = expected
        self.actual = actual


class OfflineError(Exception):
    """Raised by fetch_all when a file could not be fetched because of network errors."""

    def __init__(self, rel: str, url: str, reason: object):
        super().__init__(f"{rel}: {url}: {reason}")
        self.rel = rel
        self.url = url
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA256 digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def default_dest() -> Path:
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else REPO_ROOT / "data"


def mirror_url(base_url: str, rel: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(rel)


_LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"


def _lfs_media_url(url: str, head: bytes) -> str | None:
    """The media URL of an LFS object when raw.githubusercontent.com served its pointer."""
    prefix = "https://raw.githubusercontent.com/"
    if url.startswith(prefix) and head.startswith(_LFS_HEADER):
        return "https://media.githubusercontent.com/media/" + url[len(prefix):]
    return None


def _install(tmp: str | os.PathLike, dest: Path) -> None:
    """Give the temporary file ordinary permissions (mkstemp makes it 0600) and rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, dest)


def _is_network_failure(exc: BaseException) -> bool:
    return isinstance(exc, (socket.timeout, TimeoutError, ConnectionError, socket.gaierror))


def _open(url: str, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise NotFoundError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            raise NotFoundError(f"{url}: {e.reason}") from None
        raise NetworkError(url, e.reason) from None
    except http.client.HTTPException as e:  # malformed / truncated response
        raise NetworkError(url, e) from None
    except OSError as e:  # timeouts / resets raised before urllib wraps them
        if _is_network_failure(e):
            raise NetworkError(url, e) from None
        raise


def download(
    url: str,
    dest: str | os.PathLike,
    expected_sha256: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    label: str | None = None,
    _follow_lfs: bool = True,
) -> str:
    """Download ``url`` to ``dest`` atomically and return the content's SHA256.

    The bytes go to a temporary file in dest's directory, which is renamed onto ``dest`` only
    when the digest equals ``expected_sha256`` (if given). On any failure the temporary file is
    removed and ``dest`` is left untouched.

    Raises NetworkError (host unreachable / timeout), NotFoundError (HTTP error status) or
    ChecksumMismatch.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        head = b""
        with os.fdopen(fd, "wb") as out:
            resp = _open(url, timeout)
            with resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                bar = None
                if _tqdm is not None and sys.stderr.isatty():
                    bar = _tqdm(total=total, unit="B", unit_scale=True, leave=False,
                                desc=label or dest.name)
                received = 0
                try:
                    while True:
                        try:
                            block = resp.read(CHUNK)
                        except (OSError, http.client.HTTPException) as e:
                            raise NetworkError(url, e) from None
                        if not block:
                            break
                        if len(head) < 256:
                            head += block[: 256 - len(head)]
                        out.write(block)
                        h.update(block)
                        received += len(block)
                        if bar is not None:
                            bar.update(len(block))
                finally:
                    if bar is not None:
                        bar.close()
                if total is not None and received < total:
                    raise NetworkError(url, f"connection closed after {received} of {total} bytes")
        actual = h.hexdigest()
        if expected_sha256 is not None and actual != expected_sha256:
            media = _lfs_media_url(url, head) if _follow_lfs else None
            if media is not None:
                tmp.unlink(missing_ok=True)
                return download(media, dest, expected_sha256, timeout=timeout, label=label,
                                _follow_lfs=False)
            raise ChecksumMismatch(url, expected_sha256, actual)
        _install(tmp, dest)
        return actual
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Local derivation of DERIVED_counterfact_rome_format_subset_1476.json
# --------------------------------------------------------------------------------------------
CF_ROME_SUBSETS = (
    "counterfact/counterfact_portability_gpt4.json",
    "counterfact/counterfact_subject_replace.json",
    "counterfact/counterfact_with_dependancies_sample.json",
    "counterfact/counterfact_with_story_prompts.json",
)
CF_ROME_KEYS = (
    "case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts",
    "neighborhood_prompts", "attribute_prompts", "generation_prompts",
)


def build_counterfact_rome_subset(root: str | os.PathLike) -> bytes:
    """Union of the four ROME-format CounterFact subsets under ``root``.

    Each record keeps only ROME's fields (the subset-specific extra field is dropped),
    duplicates are merged by ``case_id`` and the list is sorted by ``case_id``; serialised with
    ``json.dumps`` defaults (ASCII escapes, no indentation, no trailing newline).
    """
    root = Path(root)
    by_case: dict[int, dict] = {}
    for rel in CF_ROME_SUBSETS:
        with open(root / rel, encoding="utf-8") as f:
            records = json.load(f)
        for r in records:
            slim = {k: r[k] for k in CF_ROME_KEYS}
            by_case.setdefault(slim["case_id"], slim)
    return json.dumps([by_case[c] for c in sorted(by_case)]).encode("ascii")


def derive_counterfact_rome_subset(root: str | os.PathLike, dest: str | os.PathLike,
                                   expected_sha256: str | None) -> str:
    """Write the derived subset to ``dest`` atomically (after checking its digest)."""
    data = build_counterfact_rome_subset(root)
    actual = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise ChecksumMismatch("(derived locally)", expected_sha256, actual)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        _install(tmp_name, dest)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return actual


DERIVATIONS: dict[str, tuple[Callable[..., str], tuple[str, ...]]] = {
    "counterfact_rome_subset": (derive_counterfact_rome_subset, CF_ROME_SUBSETS),
}


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
@dataclass
class Result:
    rel: str
    status: str  # ok | downloaded | derived | failed | skipped | unverified
    detail: str = ""


def _select(items: Iterable, groups: Sequence[str] | None) -> list:
    return [x for x in items if groups is None or x.group in groups]


def _candidates(sources: Sequence[str], rel: str, base_url: str | None) -> list[str]:
    return [mirror_url(base_url, rel)] if base_url else list(sources)


def _fetch_one(f: DataFile, dest: Path, base_url: str | None, timeout: float,
               out: TextIO) -> Result:
    target = dest / f.rel
    urls = _candidates(f.sources, f.rel, base_url)
    network_failure: NetworkError | None = None
    mismatch: ChecksumMismatch | None = None
    missing: list[str] = []
    unreachable: set[str] = set()  # hosts that already failed: do not wait on them again
    for url in urls:
        host = urllib.parse.urlsplit(url).netloc
        if host in unreachable:
            continue
        try:
            download(url, target, f.sha256, timeout=timeout, label=f.rel)
            return Result(f.rel, "downloaded", url)
        except NetworkError as e:
            network_failure = network_failure or e
            unreachable.add(host)
        except NotFoundError as e:
            missing.append(str(e))
        except ChecksumMismatch as e:
            mismatch = e
            print(f"  checksum mismatch for {f.rel} from {e.url}: expected {e.expected}, "
                  f"got {e.actual} (download discarded)", file=out)
    if f.derive is not None:
        func, needs = DERIVATIONS[f.derive]
        absent = [r for r in needs if not (dest / r).is_file()]
        if absent:
            return Result(f.rel, "failed", "cannot derive it, missing: " + ", ".join(absent))
        try:
            func(dest, target, f.sha256)
            return Result(f.rel, "derived", "built from " + ", ".join(needs))
        except ChecksumMismatch as e:
            return Result(f.rel, "failed", f"derived file has sha256 {e.actual}, "
                                           f"expected {e.expected} (discarded)")
    if mismatch is not None:
        return Result(f.rel, "failed", f"checksum mismatch: expected sha256 {mismatch.expected}, "
                                       f"got {mismatch.actual} (from {mismatch.url}; discarded)")
    if network_failure is not None:
        raise OfflineError(f.rel, network_failure.url, network_failure.reason)
    return Result(f.rel, "failed", "not found at any source: " + "; ".join(missing))


def fetch_all(
    dest: str | os.PathLike,
    groups: Sequence[str] | None = None,
    *,
    force: bool = False,
    base_url: str | None = None,
    extra: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    files: Sequence[DataFile] | None = None,
    extra_files: Sequence[ExtraFile] | None = None,
    out: TextIO | None = None,
) -> list[Result]:
    """Make sure every selected file is present in ``dest`` with its digest.

    Returns one Result per file. Raises OfflineError when a file could not be fetched because
    its host could not be reached (the remaining files are not attempted).
    """
    out = out or sys.stdout
    dest = Path(dest)
    files = FILES if files is None else files
    extra_files = EXTRA_FILES if extra_files is None else extra_files
    results: list[Result] = []
    for f in _select(files, groups):
        target = dest / f.rel
        if target.is_file() and not force:
            actual = sha256_of(target)
            if actual == f.sha256:
                results.append(Result(f.rel, "ok", "already present, checksum verified"))
                print(f"ok          {f.rel} (already present, checksum verified)", file=out)
                continue
            print(f"  {f.rel} is present but its sha256 is {actual}, expected {f.sha256}; "
                  "fetching it again", file=out)
        res = _fetch_one(f, dest, base_url, timeout, out)
        results.append(res)
        tag = {"downloaded": "downloaded", "derived": "derived", "failed": "FAILED"}[res.status]
        print(f"{tag:<11} {f.rel}" + (f": {res.detail}" if res.status == "failed" else ""),
              file=out)
    if extra:
        for x in _select(extra_files, groups):
            results.append(_fetch_extra(x, dest, base_url, timeout, force, out))
    return results


def _fetch_extra(x: ExtraFile, dest: Path, base_url: str | None, timeout: float, force: bool,
                 out: TextIO) -> Result:
    target = dest / x.rel
    if target.is_file() and not force:
        print(f"present     {x.rel} (UNVERIFIED: no checksum in our table)", file=out)
        return Result(x.rel, "skipped", "already present (unverified)")
    network_failure: NetworkError | None = None
    missing: list[str] = []
    for url in _candidates(x.sources, x.rel, base_url):
        try:
            actual = download(url, target, None, timeout=timeout, label=x.rel)
        except NetworkError as e:
            network_failure = network_failure or e
            continue
        except NotFoundError as e:
            missing.append(str(e))
            continue
        note = f"sha256 {actual}"
        if x.reference_sha256:
            same = actual == x.reference_sha256
            note += (" (matches" if same else " (DIFFERS from") + \
                f" the published reference {x.reference_sha256})"
        print(f"UNVERIFIED  {x.rel}: downloaded from {url}; no checksum in our table; {note}",
              file=out)
        return Result(x.rel, "unverified", note)
    if network_failure is not None:
        raise OfflineError(x.rel, network_failure.url, network_failure.reason)
    print(f"FAILED      {x.rel}: not found at any source: " + "; ".join(missing), file=out)
    return Result(x.rel, "failed", "; ".join(missing))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def offline_message(err: OfflineError, dest: Path, files: Sequence[DataFile]) -> str:
    layout = "\n".join(f"    {f.rel}" for f in files)
    return (
        f"ERROR: could not download {err.rel}\n"
        f"  from {err.url}\n"
        f"  ({err.reason})\n"
        "This machine appears to be offline (or cannot reach the data host).\n"
        "To get the benchmark data onto it, either\n"
        f"  * copy the files from a machine with internet into {dest}\n"
        "    (there: python scripts/get_data.py --dest DIR, then copy DIR), or\n"
        f"  * set {ENV_DATA_DIR} to a directory that already has them, or\n"
        f"  * point --base-url / {ENV_BASE_URL} at a reachable mirror.\n"
        f"Expected layout (relative to the data directory):\n{layout}\n"
        f"(The WISE sets are also in the official archive: {WISE_DRIVE_URL})"
    )


def list_files(dest: Path, groups: Sequence[str] | None, out: TextIO) -> None:
    print(f"data directory: {dest}", file=out)
    for f in _select(FILES, groups):
        target = dest / f.rel
        if not target.is_file():
            state = "missing"
        elif sha256_of(target) == f.sha256:
            state = "ok"
        else:
            state = "BAD CHECKSUM"
        print(f"{state:<13} {f.rel}  sha256={f.sha256[:16]}...", file=out)
        for url in f.sources:
            print(f"{'':<15}source: {url}", file=out)
        if f.derive:
            print(f"{'':<15}derived locally from: {', '.join(DERIVATIONS[f.derive][1])}", file=out)
    extras = _select(EXTRA_FILES, groups)
    if extras:
        print("extra files (--extra; no checksum in our table, unverified):", file=out)
        for x in extras:
            state = "present" if (dest / x.rel).is_file() else "missing"
            print(f"{state:<13} {x.rel}  ({x.note})", file=out)
            for url in x.sources:
                print(f"{'':<15}source: {url}", file=out)
    print(f"official WISE archive (Google Drive id {WISE_DRIVE_FILE_ID}): {WISE_DRIVE_URL}",
          file=out)


def parse_groups(text: str | None) -> list[str] | None:
    if not text:
        return None
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    return groups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Download and verify the wise-bench benchmark data.",
        epilog="Exit codes: 0 ok, 1 missing/corrupt files, 2 offline or bad arguments.",
    )
    p.add_argument("--dest", type=Path, default=None,
                   help=f"data directory (default: ${ENV_DATA_DIR}, else <repo>/data)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated groups to fetch ({','.join(GROUPS)})")
    p.add_argument("--force", action="store_true",
                   help="download again even when a file is present with the right checksum")
    p.add_argument("--list", action="store_true",
                   help="list the files, their state in DEST and their sources; download nothing")
    p.add_argument("--extra", action="store_true",
                   help="also fetch the larger unverified files "
                        "(full ZsRE, ROME/MEMIT CounterFact)")
    p.add_argument("--base-url", default=None,
                   help=f"mirror serving <URL>/<relative path> (default: ${ENV_BASE_URL})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"network timeout in seconds (default {DEFAULT_TIMEOUT:g})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        groups = parse_groups(args.only)
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    dest = (args.dest.expanduser() if args.dest else default_dest()).resolve()
    base_url = args.base_url or os.environ.get(ENV_BASE_URL) or None

    if args.list:
        list_files(dest, groups, sys.stdout)
        return 0

    print(f"data directory: {dest}" + (f"  (mirror: {base_url})" if base_url else ""))
    try:
        results = fetch_all(dest, groups, force=args.force, base_url=base_url, extra=args.extra,
                            timeout=args.timeout)
    except OfflineError as e:
        print(offline_message(e, dest, _select(FILES, groups)), file=sys.stderr)
        return 2

    failed = [r for r in results if r.status == "failed"]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    print("summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if failed:
        print(f"ERROR: {len(failed)} file(s) could not be obtained with the right checksum:",
              file=sys.stderr)
        for r in failed:
            print(f"  {r.rel}: {r.detail}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
