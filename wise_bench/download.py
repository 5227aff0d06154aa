"""Download the wise-bench benchmark data and verify every file against its SHA256 digest.

Usage::

    python -m wise_bench.download [--dest DIR] [--only zsre,hallucination,temporal,counterfact]
                                  [--list] [--base-url URL] [--extra] [--retries N]

Files land in DIR (default: where the app reads them, ``$WISE_BENCH_DATA_DIR``, else
``<repo>/data``) under the relative paths of ``RELEASE``. Downloads go through pooch: each file
is written to a temporary file, checked against its digest and only then moved into place, so a
file whose digest differs is never installed, and a file already present with the right digest
is not downloaded again.

The release files come from public GitHub repositories pinned to full commit SHAs.
``--base-url URL`` (or ``$WISE_BENCH_DATA_URL``) fetches every file from ``URL/<relative path>``
instead: a mirror laid out like the data directory. The digests are checked either way.

``counterfact/DERIVED_counterfact_rome_format_subset_1476.json`` has no public copy: it is rebuilt
from the four ROME-format CounterFact subsets and verified against its digest like the others.

``--extra`` also fetches larger files the benchmark does not need (``EXTRA``). Those without a
known digest are reported as UNVERIFIED, here and by ``--list``, with the digest of what arrived.

Exit codes: 0 every selected file is present (verified, or an UNVERIFIED extra); 1 some file could
not be obtained or failed its checksum; 2 bad arguments, or a data host could not be reached
(offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import pooch
import requests

from wise_bench.config import REPO_ROOT

ENV_DATA_DIR = "WISE_BENCH_DATA_DIR"
ENV_BASE_URL = "WISE_BENCH_DATA_URL"
GROUPS = ("zsre", "hallucination", "temporal", "counterfact")

RAW = "https://raw.githubusercontent.com"
# Git LFS objects: raw.githubusercontent.com would serve the pointer, not the file.
LFS = "https://media.githubusercontent.com/media"
# owner/repo/commit/folder. The data README names abbreviated commits for some of these; these
# are full SHAs whose stored copies match our files in length and ending.
REPAIR = "sci-m-wang/REPAIR/ab1b995c8ca61719a9dc238a81bb019e0f1baae7/data/wise"
KNOWLEDGESPREAD = "Jometeorie/KnowledgeSpread/d1a8d1ed5367e66010d4d9b081ab388b46c2438c/data"
# Only "dataset/" is known for this repository; the sub-paths follow our layout and are unconfirmed.
LEONZ = "leonz-z/EasyEdit/5d49c472bd4b8447a70d276fb577d28088588e62/dataset"
LONGFORM = "domenicrosati/longform_edit_model_evals/{}/data"
LONGFORM_DEPENDENCIES = LONGFORM.format("4ebb3790883d2100ed917c1cc9acd285e76aa52c")
# An earlier commit (the stored copy found; 4ebb3790 in the data README likely has the same file).
LONGFORM_STORIES = LONGFORM.format("87602d8eca1590362317864800d3948df4946821")

DERIVED_CF = "counterfact/DERIVED_counterfact_rome_format_subset_1476.json"

# relative path -> (SHA256 from the data release's SHA256SUMS, source; None = built locally)
RELEASE: dict[str, tuple[str, str | None]] = {
    "zsre/zsre_mend_edit.json": (
        "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
        f"{LFS}/{REPAIR}/ZsRE/zsre_mend_edit.json"),
    "zsre/zsre_mend_train-1k.json": (
        "09dbb446f4afa1e500e051806430d286ef260fa6dd89e3590a9756f8b060a229",
        f"{RAW}/{KNOWLEDGESPREAD}/zsre/zsre_mend_train-1k.json"),
    "zsre/zsre_inverse_relation.json": (
        "34d07e57e0b8273f9418eb1925c38ba0294d94b986f5b291df41d968b0fe06e3",
        f"{RAW}/{LEONZ}/zsre/zsre_inverse_relation.json"),
    "zsre/zsre_subject_replace.json": (
        "bcb6d394b390329828898799220916ebc0ae95617c8c94fc60bf527692e41740",
        f"{RAW}/{LEONZ}/zsre/zsre_subject_replace.json"),
    "hallucination/hallucination-edit.json": (
        "523ce88b5299047bf58ea3ad8b7e9d12635592543df54b58c8eaf16d5e68aaaf",
        f"{RAW}/{REPAIR}/hallucination/hallucination-edit.json"),
    # Not among REPAIR's stored files; assumed beside hallucination-edit.json (unconfirmed).
    "hallucination/hallucination-train.json": (
        "ef280a0ce9aa194c545e7a1c7983df181b8e48dbfb1945ffe40e1903cca0d297",
        f"{RAW}/{REPAIR}/hallucination/hallucination-train.json"),
    "temporal/temporal-edit.json": (
        "3c27956224d56111762e7b56ca0595dc638cc005faaf322a01c48ecd5283aef8",
        f"{RAW}/{REPAIR}/temporal/temporal-edit.json"),
    "temporal/temporal-train.json": (
        "0ba8c40de49bd0d0ffc1da69ac17fcfce6db8c32bf36a7df5c88730b48e1172a",
        f"{RAW}/{REPAIR}/temporal/temporal-train.json"),
    "counterfact/counterfact-edit.json": (
        "20c225e6299b3c5b2c569bd9103aa212806e0d1e6e0c307de5c379773979b967",
        f"{RAW}/{KNOWLEDGESPREAD}/counterfact/counterfact-edit.json"),
    "counterfact/counterfact-train.json": (
        "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
        f"{RAW}/{KNOWLEDGESPREAD}/counterfact/counterfact-train.json"),
    "counterfact/counterfact-edit-1k.json": (
        "39ffb00c9468d833b8594668b218b07590e85aa6332f667cf5ccf1bf1b576384",
        f"{RAW}/{KNOWLEDGESPREAD}/counterfact/counterfact-edit-1k.json"),
    "counterfact/counterfact_portability_gpt4.json": (
        "fac215b31d9481a33e055ac85145d1d711217dfd20ad3c45e61fc2d6b540c5ed",
        f"{RAW}/{LEONZ}/counterfact/counterfact_portability_gpt4.json"),
    "counterfact/counterfact_subject_replace.json": (
        "36a81b8dd513680743347d94acd00fd5f3e25baafbe6ebe951e16ff0f36f9b9d",
        f"{RAW}/{LEONZ}/counterfact/counterfact_subject_replace.json"),
    "counterfact/counterfact_with_story_prompts.json": (
        "98a6975bca0ea14e692416ccac80a412d15d1110cab661b743a596684542a56b",
        f"{RAW}/{LONGFORM_STORIES}/counterfact_with_story_prompts.json"),
    "counterfact/counterfact_with_dependancies_sample.json": (
        "fbaf34eda6ad08aba95325889c0a6c7c1cc8be1299b7d446d7d1a24c09e6f514",
        f"{RAW}/{LONGFORM_DEPENDENCIES}/counterfact_with_dependancies_sample.json"),
    # Built from the four subsets above, which are fetched before it (dict order).
    DERIVED_CF: ("d4ee9ce5797bcaabd17a4999dbf1d2ab5122754b29f7bce99f15bb2b6682b904", None),
}

# relative path -> (SHA256 or None when no digest is known, source). Fetched only with --extra.
EXTRA: dict[str, tuple[str | None, str]] = {
    # Digests: the Git LFS oids of REPAIR's copies (oid = SHA256 of the content).
    "zsre/zsre_mend_eval.json": (
        "8a371d512f8a6ab175db4ef672181d5c0e52da23298cb51e5a2eeea2f89aa9cd",
        f"{LFS}/{REPAIR}/ZsRE/zsre_mend_eval.json"),
    "zsre/zsre_mend_train.json": (
        "4f3ac245e9c0baaf633f9e6cb765ffa8e83d594a74520a6cc3539497328c0722",
        f"{LFS}/{REPAIR}/ZsRE/zsre_mend_train.json"),
    "counterfact/counterfact.json": (None, "https://rome.baulab.info/data/dsets/counterfact.json"),
    "counterfact/multi_counterfact.json": (
        None, "https://memit.baulab.info/data/dsets/multi_counterfact.json"),
}

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

    Each record keeps only ROME's fields (each subset adds one of its own), the first record of
    each ``case_id`` wins, the list is sorted by ``case_id`` and serialised with ``json.dumps``
    defaults (ASCII escapes, no indentation, no trailing newline): the release file's bytes.
    """
    by_case: dict[int, dict] = {}
    for rel in CF_ROME_SUBSETS:
        for record in json.loads((Path(root) / rel).read_text(encoding="utf-8")):
            by_case.setdefault(record["case_id"], {k: record[k] for k in CF_ROME_KEYS})
    return json.dumps([by_case[c] for c in sorted(by_case)]).encode("ascii")


def default_data_dir() -> Path:
    """The app's data directory: ``${oc.env:WISE_BENCH_DATA_DIR,${repo_root:}/data}``."""
    return Path(os.environ.get(ENV_DATA_DIR, REPO_ROOT / "data")).expanduser().resolve()


def _select(table: dict, groups: Sequence[str] | None) -> dict:
    return {rel: v for rel, v in table.items() if groups is None or rel.split("/")[0] in groups}


def _source(rel: str, url: str | None, base_url: str | None) -> str:
    if url is None:
        return "built locally from " + ", ".join(CF_ROME_SUBSETS)
    return f"{base_url.rstrip('/')}/{rel}" if base_url else url


def _action(_path: str, action: str, _pooch) -> str:
    """pooch processor: tells whether the file was downloaded, updated or already there."""
    return action


def _builder(dest: Path):
    """A pooch downloader that writes the derived CounterFact subset built from ``dest``."""

    def build(_url: str, output_file: str, _pooch) -> None:
        Path(output_file).write_bytes(build_counterfact_rome_subset(dest))

    return build


def _obtain(rel: str, digest: str | None, url: str | None, dest: Path, base_url: str | None,
            retries: int) -> tuple[str, str]:
    """Fetch one file with pooch (digest checked before it is moved into place).

    Returns (pooch's action: download | update | fetch, the URL used).
    """
    if url is None:
        missing = [r for r in CF_ROME_SUBSETS if not (dest / r).is_file()]
        if missing:
            raise FileNotFoundError("cannot build it, missing: " + ", ".join(missing))
        downloader = _builder(dest)
    else:
        downloader = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), chunk_size=1 << 16)
    source = _source(rel, url, base_url)
    # No retries for the derived file: building it again gives the same bytes.
    pup = pooch.Pooch(path=dest, base_url="", registry={rel: digest and f"sha256:{digest}"},
                      urls={rel: source}, retry_if_failed=retries if url else 0)
    action = pup.fetch(rel, processor=_action, downloader=downloader)
    if action != "fetch":
        # pooch's temporary file was created with mode 0600 (tempfile); use the umask instead.
        umask = os.umask(0)
        os.umask(umask)
        (dest / rel).chmod(0o666 & ~umask)
    return action, source


def fetch(dest: Path, files: dict[str, tuple[str | None, str | None]], base_url: str | None,
          retries: int) -> int:
    """Make every file of ``files`` present in ``dest`` with its digest; return the exit code."""
    failed: list[str] = []
    for rel, (digest, url) in files.items():
        try:
            action, source = _obtain(rel, digest, url, dest, base_url, retries)
        except (requests.ConnectionError, requests.Timeout) as e:
            print(f"ERROR: could not download {rel} ({e}).\n"
                  "This machine appears to be offline (or cannot reach the data host). Either\n"
                  f"  * copy the data directory from a machine with internet into {dest}, or\n"
                  f"  * set {ENV_DATA_DIR} to a directory that already holds the files, or\n"
                  f"  * point --base-url / {ENV_BASE_URL} at a reachable mirror.",
                  file=sys.stderr)
            return 2
        except (ValueError, requests.HTTPError, FileNotFoundError) as e:
            # pooch raises ValueError when the digest differs; nothing was moved into place.
            failed.append(f"{rel}: {e}")
            print(f"FAILED      {rel}: {e}")
            continue
        status = {"fetch": "present", "download": "downloaded", "update": "replaced"}[action]
        if url is None and action != "fetch":
            status = "built"
        if digest is None:
            print(f"UNVERIFIED  {rel} ({status}; no known digest, its sha256 is "
                  f"{pooch.file_hash(str(dest / rel))})")
        else:
            print(f"{status:<11} {rel}" + ("" if action == "fetch" else f"  <- {source}"))
    if failed:
        print(f"ERROR: {len(failed)} file(s) could not be obtained with the right checksum:\n  "
              + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def list_files(dest: Path, groups: Sequence[str] | None, base_url: str | None) -> None:
    """State of every known file in ``dest`` and where it comes from; downloads nothing."""
    print(f"data directory: {dest}")
    tables = ((_select(RELEASE, groups), ""), (_select(EXTRA, groups), "  (only with --extra)"))
    for table, note in tables:
        for rel, (digest, url) in table.items():
            path = dest / rel
            if digest is None:
                state = "present" if path.is_file() else "missing"
                check = "UNVERIFIED: no known digest"
            else:
                state = ("missing" if not path.is_file() else
                         "ok" if pooch.file_hash(str(path)) == digest else "BAD CHECKSUM")
                check = f"sha256 {digest[:16]}..."
            print(f"{state:<13} {rel}  {check}{note}")
            print(f"{'':<14}source: {_source(rel, url, base_url)}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wise_bench.download",
        description="Download the benchmark data and verify it against SHA256 digests.",
        epilog="Exit codes: 0 ok, 1 a file missing or with a bad checksum, "
               "2 bad arguments or offline.",
    )
    parser.add_argument("--dest", type=Path,
                        help=f"data directory (default: ${ENV_DATA_DIR}, else <repo>/data)")
    parser.add_argument("--only", help=f"comma-separated groups ({','.join(GROUPS)})")
    parser.add_argument("--list", action="store_true",
                        help="show each file's state and source; download nothing")
    parser.add_argument("--base-url", default=os.environ.get(ENV_BASE_URL) or None,
                        help=f"mirror serving URL/<relative path> (default: ${ENV_BASE_URL})")
    parser.add_argument("--extra", action="store_true",
                        help="also fetch the larger files the benchmark does not need")
    parser.add_argument("--retries", type=int, default=3,
                        help="extra attempts per file after a failed download (default 3)")
    args = parser.parse_args(argv)
    if args.only:
        args.only = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = sorted(set(args.only) - set(GROUPS))
        if unknown or not args.only:
            parser.error(f"unknown group(s) {', '.join(unknown) or repr('')}; "
                         f"choose from {', '.join(GROUPS)}")
    if args.base_url and not args.base_url.startswith(("http://", "https://")):
        parser.error(f"--base-url must be an http:// or https:// URL, got {args.base_url!r}")
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dest = args.dest.expanduser().resolve() if args.dest else default_data_dir()
    if args.list:
        list_files(dest, args.only, args.base_url)
        return 0
    print(f"data directory: {dest}" + (f"  (mirror: {args.base_url})" if args.base_url else ""))
    files = _select({**RELEASE, **(EXTRA if args.extra else {})}, args.only)
    return fetch(dest, files, args.base_url, args.retries)


if __name__ == "__main__":
    sys.exit(main())
