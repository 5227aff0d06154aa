"""Tests of scripts/get_data.py against a local HTTP server (127.0.0.1 only, never the internet)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "get_data.py"

# sha256(b"abc"), the FIPS 180-2 test vector.
ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
HELLO = b'[{"prompt": "hello"}]\n'


def _load_script():
    spec = importlib.util.spec_from_file_location("wise_bench_get_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


gd = _load_script()


# --------------------------------------------------------------------------------------------
# Local server
# --------------------------------------------------------------------------------------------
class _Server:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def served(tmp_path):
    """A served directory laid out like the data directory, with two small files."""
    root = tmp_path / "served"
    (root / "zsre").mkdir(parents=True)
    (root / "temporal").mkdir()
    (root / "zsre" / "tiny.json").write_bytes(b"abc")
    (root / "temporal" / "hello.json").write_bytes(HELLO)
    with _Server(root) as srv:
        yield srv


@pytest.fixture
def table(monkeypatch):
    """Replace the checksum table by fixture entries (public sources must never be used)."""
    files = [
        gd.DataFile("zsre/tiny.json", ABC_SHA256, ("http://127.0.0.1:9/unused",)),
        gd.DataFile("temporal/hello.json", hashlib.sha256(HELLO).hexdigest()),
    ]
    monkeypatch.setattr(gd, "FILES", files)
    monkeypatch.setattr(gd, "EXTRA_FILES", [])
    monkeypatch.delenv(gd.ENV_BASE_URL, raising=False)
    monkeypatch.delenv(gd.ENV_DATA_DIR, raising=False)
    return files


def _closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def test_sha256_of(tmp_path):
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert gd.sha256_of(p) == ABC_SHA256


def test_download_verifies_and_is_atomic(served, tmp_path):
    dest = tmp_path / "out" / "zsre" / "tiny.json"
    assert gd.download(f"{served.url}/zsre/tiny.json", dest, ABC_SHA256, timeout=5) == ABC_SHA256
    assert dest.read_bytes() == b"abc"
    with pytest.raises(gd.ChecksumMismatch) as info:
        gd.download(f"{served.url}/temporal/hello.json", tmp_path / "bad.json", ABC_SHA256,
                    timeout=5)
    assert info.value.actual == hashlib.sha256(HELLO).hexdigest()
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(gd.NotFoundError):
        gd.download(f"{served.url}/nope.json", tmp_path / "nope.json", timeout=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "served"]  # no temp files left


def test_every_shipped_file_has_a_digest_and_a_source():
    rels = [f.rel for f in gd.FILES]
    assert len(rels) == len(set(rels)) == 16
    for f in gd.FILES:
        assert f.group in gd.GROUPS
        assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
        assert f.sources or f.derive
        for url in f.sources:
            assert url.startswith("https://raw.githubusercontent.com/")
    # a derived file comes after the files it is built from
    order = {f.rel: i for i, f in enumerate(gd.FILES)}
    for f in gd.FILES:
        if f.derive:
            for need in gd.DERIVATIONS[f.derive][1]:
                assert order[need] < order[f.rel]


# --------------------------------------------------------------------------------------------
# main() against the local server
# --------------------------------------------------------------------------------------------
def test_download_lands_at_relative_path(served, table, tmp_path, capsys):
    dest = tmp_path / "data"
    assert gd.main(["--dest", str(dest), "--base-url", served.url]) == 0
    assert (dest / "zsre" / "tiny.json").read_bytes() == b"abc"
    assert (dest / "temporal" / "hello.json").read_bytes() == HELLO
    assert sorted(served.requests) == ["/temporal/hello.json", "/zsre/tiny.json"]
    out = capsys.readouterr().out
    assert "downloaded  zsre/tiny.json" in out


def test_second_run_skips_valid_files(served, table, tmp_path, capsys):
    dest = tmp_path / "data"
    assert gd.main(["--dest", str(dest), "--base-url", served.url]) == 0
    n = len(served.requests)
    capsys.readouterr()
    assert gd.main(["--dest", str(dest), "--base-url", served.url]) == 0
    assert len(served.requests) == n  # nothing requested again
    out = capsys.readouterr().out
    assert "ok          zsre/tiny.json" in out and "ok          temporal/hello.json" in out
    # --force fetches again
    assert gd.main(["--dest", str(dest), "--base-url", served.url, "--force"]) == 0
    assert len(served.requests) == n + 2


def test_only_selects_groups(served, table, tmp_path, monkeypatch):
    dest = tmp_path / "data"
    monkeypatch.setenv(gd.ENV_BASE_URL, served.url)  # the env var works like --base-url
    assert gd.main(["--dest", str(dest), "--only", "temporal"]) == 0
    assert (dest / "temporal" / "hello.json").is_file()
    assert not (dest / "zsre").exists()
    assert served.requests == ["/temporal/hello.json"]
    assert gd.main(["--dest", str(dest), "--only", "bogus"]) == 2


def test_dest_defaults_to_env(served, table, tmp_path, monkeypatch):
    dest = tmp_path / "envdata"
    monkeypatch.setenv(gd.ENV_DATA_DIR, str(dest))
    assert gd.main(["--base-url", served.url, "--only", "zsre"]) == 0
    assert (dest / "zsre" / "tiny.json").is_file()


def test_corrupted_file_fails_and_leaves_nothing(served, table, tmp_path, capsys):
    (served.root / "zsre" / "tiny.json").write_bytes(b"abd")  # wrong bytes
    dest = tmp_path / "data"
    assert gd.main(["--dest", str(dest), "--base-url", served.url]) == 1
    assert not (dest / "zsre" / "tiny.json").exists()
    assert list((dest / "zsre").iterdir()) == []  # no partial download either
    assert (dest / "temporal" / "hello.json").is_file()  # the good file still arrived
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "zsre/tiny.json" in captured.err
    assert ABC_SHA256 in text and hashlib.sha256(b"abd").hexdigest() in text
    assert "Traceback" not in text


def test_present_file_with_bad_digest_is_replaced(served, table, tmp_path):
    dest = tmp_path / "data"
    (dest / "zsre").mkdir(parents=True)
    (dest / "zsre" / "tiny.json").write_bytes(b"stale")
    assert gd.main(["--dest", str(dest), "--base-url", served.url, "--only", "zsre"]) == 0
    assert (dest / "zsre" / "tiny.json").read_bytes() == b"abc"


def test_missing_file_on_mirror_fails(served, table, tmp_path, capsys):
    (served.root / "temporal" / "hello.json").unlink()
    assert gd.main(["--dest", str(tmp_path / "d"), "--base-url", served.url]) == 1
    assert "temporal/hello.json" in capsys.readouterr().err


def test_unreachable_server_gives_offline_message(table, tmp_path, capsys):
    dest = tmp_path / "data"
    url = f"http://127.0.0.1:{_closed_port()}"
    assert gd.main(["--dest", str(dest), "--base-url", url, "--timeout", "2"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "zsre/tiny.json" in err
    assert "offline" in err
    assert gd.ENV_DATA_DIR in err and str(dest) in err
    assert "temporal/hello.json" in err  # the expected layout is listed
    assert "Traceback" not in captured.out + err
    assert not (dest / "zsre" / "tiny.json").exists()


def test_lfs_pointer_is_followed(monkeypatch, tmp_path):
    """A raw.githubusercontent.com answer that is a Git LFS pointer is fetched from media."""
    pointer = (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + ABC_SHA256.encode()
               + b"\nsize 3\n")
    bodies = {"raw": pointer, "media": b"abc"}
    seen = []

    class Resp:
        def __init__(self, body):
            self.body, self.headers = body, {"Content-Length": str(len(body))}

        def read(self, n):
            chunk, self.body = self.body[:n], self.body[n:]
            return chunk

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_open(url, timeout):
        seen.append(url)
        return Resp(bodies["media" if url.startswith("https://media.") else "raw"])

    monkeypatch.setattr(gd, "_open", fake_open)  # no network at all
    dest = tmp_path / "x.json"
    raw = "https://raw.githubusercontent.com/o/r/0123abcd/data/x.json"
    assert gd.download(raw, dest, ABC_SHA256) == ABC_SHA256
    assert dest.read_bytes() == b"abc"
    assert seen == [raw, "https://media.githubusercontent.com/media/o/r/0123abcd/data/x.json"]


def test_list_makes_no_request(served, table, tmp_path, capsys):
    assert gd.main(["--dest", str(tmp_path), "--base-url", served.url, "--list"]) == 0
    assert served.requests == []
    assert "missing       zsre/tiny.json" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Derived CounterFact subset
# --------------------------------------------------------------------------------------------
def _rome_record(case_id: int, extra: str) -> dict:
    rec = {k: f"{k}-{case_id}" for k in gd.CF_ROME_KEYS}
    rec["case_id"] = case_id
    rec[extra] = "dropped"
    return rec


def test_derived_subset_is_built_and_verified(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    (root / "counterfact").mkdir(parents=True)
    ids = [[5, 1], [1, 3], [7], [3, 2]]
    for rel, case_ids in zip(gd.CF_ROME_SUBSETS, ids):
        (root / rel).write_text(json.dumps([_rome_record(c, "extra") for c in case_ids]))
    expected = json.dumps([{k: _rome_record(c, "x")[k] for k in gd.CF_ROME_KEYS}
                           for c in [1, 2, 3, 5, 7]]).encode()
    assert gd.build_counterfact_rome_subset(root) == expected

    digest = hashlib.sha256(expected).hexdigest()
    monkeypatch.setattr(gd, "FILES", [gd.DataFile(gd.DERIVED_CF, digest, (),
                                                  derive="counterfact_rome_subset")])
    monkeypatch.delenv(gd.ENV_BASE_URL, raising=False)
    assert gd.main(["--dest", str(root)]) == 0
    assert (root / gd.DERIVED_CF).read_bytes() == expected
    assert "derived     " + gd.DERIVED_CF in capsys.readouterr().out

    (root / gd.DERIVED_CF).unlink()
    monkeypatch.setattr(gd, "FILES", [gd.DataFile(gd.DERIVED_CF, ABC_SHA256, (),
                                                  derive="counterfact_rome_subset")])
    assert gd.main(["--dest", str(root)]) == 1
    assert not (root / gd.DERIVED_CF).exists()


# --------------------------------------------------------------------------------------------
# Consistency with the real data release (skipped where it is absent)
# --------------------------------------------------------------------------------------------
def _real_data_dir() -> Path | None:
    for cand in (os.environ.get("WISE_BENCH_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "SHA256SUMS").is_file():
            return Path(cand)
    return None


REAL = _real_data_dir()
needs_real = pytest.mark.skipif(
    REAL is None,
    reason="real benchmark data absent (set WISE_BENCH_DATA_DIR to a directory with SHA256SUMS)",
)


@pytest.mark.integration
@needs_real
def test_table_matches_release_checksums():
    sums = {}
    for line in (REAL / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            sums[rel.lstrip("*")] = digest
    assert {f.rel: f.sha256 for f in gd.FILES} == sums


@pytest.mark.integration
@needs_real
def test_derivation_reproduces_release_file():
    digest = {f.rel: f.sha256 for f in gd.FILES}[gd.DERIVED_CF]
    assert hashlib.sha256(gd.build_counterfact_rome_subset(REAL)).hexdigest() == digest
