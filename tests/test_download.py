"""Tests of wise_bench.download against a local HTTP server (127.0.0.1 only, never the internet)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from wise_bench import download as dl

HELLO = b'[{"prompt": "hello"}]\n'


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Server:
    """Serves a directory on 127.0.0.1, records the paths requested and can fail on purpose."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.errors_to_send = 0  # answer this many next GETs with HTTP 500
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                server.requests.append(self.path)
                if server.errors_to_send:
                    server.errors_to_send -= 1
                    self.send_error(500)
                    return
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
    """A served directory with two small files, at different paths than in the data directory."""
    root = tmp_path / "served"
    (root / "src").mkdir(parents=True)
    (root / "src" / "tiny.json").write_bytes(b"abc")
    (root / "src" / "hello.json").write_bytes(HELLO)
    with _Server(root) as srv:
        yield srv


@pytest.fixture
def registry(served, monkeypatch):
    """Replace the registry by two fixture files whose sources are on the local server."""
    monkeypatch.setattr(dl, "RELEASE", {
        "zsre/tiny.json": (sha256(b"abc"), f"{served.url}/src/tiny.json"),
        "temporal/hello.json": (sha256(HELLO), f"{served.url}/src/hello.json"),
    })
    monkeypatch.setattr(dl, "EXTRA", {})
    monkeypatch.delenv(dl.ENV_BASE_URL, raising=False)
    monkeypatch.delenv(dl.ENV_DATA_DIR, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return dl.RELEASE


def _closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------
def test_file_is_installed_with_the_served_bytes(served, registry, tmp_path, capsys):
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 0
    installed = dest / "zsre" / "tiny.json"
    assert installed.read_bytes() == (served.root / "src" / "tiny.json").read_bytes()
    assert (dest / "temporal" / "hello.json").read_bytes() == HELLO
    assert served.requests == ["/src/tiny.json", "/src/hello.json"]
    # readable like any file the user writes (not tempfile's 0600)
    assert installed.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert f"downloaded  zsre/tiny.json  <- {served.url}/src/tiny.json" in capsys.readouterr().out


def test_mirror_replaces_every_source(served, registry, tmp_path, monkeypatch):
    mirror = served.root / "mirror"
    (mirror / "zsre").mkdir(parents=True)
    (mirror / "zsre" / "tiny.json").write_bytes(b"abc")
    monkeypatch.setenv(dl.ENV_BASE_URL, f"{served.url}/mirror/")  # like --base-url
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--only", "zsre", "--retries", "0"]) == 0
    assert (dest / "zsre" / "tiny.json").read_bytes() == b"abc"
    assert served.requests == ["/mirror/zsre/tiny.json"]
    assert not (dest / "temporal").exists()


def test_file_with_wrong_bytes_is_never_installed(served, registry, tmp_path, capsys):
    (served.root / "src" / "tiny.json").write_bytes(b"abd")
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 1
    assert list((dest / "zsre").iterdir()) == []  # neither the file nor a temporary copy
    assert (dest / "temporal" / "hello.json").read_bytes() == HELLO  # the good file still arrives
    captured = capsys.readouterr()
    assert "FAILED      zsre/tiny.json" in captured.out
    failure = captured.err.split("could not be obtained with the right checksum:")[1]
    assert "zsre/tiny.json" in failure and "temporal/hello.json" not in failure
    assert sha256(b"abc") in failure and sha256(b"abd") in failure


def test_present_file_is_not_downloaded_again(served, registry, tmp_path, capsys):
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 0
    assert len(served.requests) == 2
    capsys.readouterr()
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 0
    assert len(served.requests) == 2
    out = capsys.readouterr().out
    assert "present     zsre/tiny.json" in out and "present     temporal/hello.json" in out


def test_present_file_with_another_digest_is_replaced(served, registry, tmp_path, capsys):
    dest = tmp_path / "data"
    (dest / "zsre").mkdir(parents=True)
    (dest / "zsre" / "tiny.json").write_bytes(b"stale")
    assert dl.main(["--dest", str(dest), "--only", "zsre", "--retries", "0"]) == 0
    assert (dest / "zsre" / "tiny.json").read_bytes() == b"abc"
    assert "replaced    zsre/tiny.json" in capsys.readouterr().out


def test_server_error_is_retried(served, registry, tmp_path):
    served.errors_to_send = 1
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--only", "zsre", "--retries", "1"]) == 0
    assert served.requests == ["/src/tiny.json", "/src/tiny.json"]
    assert (dest / "zsre" / "tiny.json").read_bytes() == b"abc"


def test_file_missing_on_the_server_fails(served, registry, tmp_path, capsys):
    (served.root / "src" / "hello.json").unlink()
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 1
    assert not (dest / "temporal" / "hello.json").exists()
    err = capsys.readouterr().err
    assert "temporal/hello.json" in err and "404" in err


def test_unreachable_host_exits_2_with_advice(registry, tmp_path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}"
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--base-url", url, "--retries", "0"]) == 2
    err = capsys.readouterr().err
    assert "could not download zsre/tiny.json" in err and "offline" in err
    assert str(dest) in err and dl.ENV_DATA_DIR in err
    assert not (dest / "zsre" / "tiny.json").exists()


@pytest.mark.parametrize("args", [["--only", "zsre,bogus"], ["--only", ","],
                                  ["--base-url", "file:///srv/data"], ["--retries", "-1"]])
def test_bad_arguments_exit_2(args, registry, capsys):
    with pytest.raises(SystemExit) as info:
        dl.main(args)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Derived CounterFact subset
# --------------------------------------------------------------------------------------------
def _rome_record(case_id: int, own_field: str) -> dict:
    rec = {k: f"{k}-{case_id}" for k in dl.CF_ROME_KEYS}
    rec["case_id"] = case_id
    rec[own_field] = "dropped from the union"
    return rec


@pytest.fixture
def rome_subsets(tmp_path):
    """Four small ROME-format subsets (overlapping case ids) and the union they must give."""
    root = tmp_path / "data"
    (root / "counterfact").mkdir(parents=True)
    for rel, case_ids in zip(dl.CF_ROME_SUBSETS, [[5, 1], [1, 3], [7], [3, 2]]):
        (root / rel).write_text(json.dumps([_rome_record(c, rel) for c in case_ids]))
    union = [{"case_id": c, **{k: f"{k}-{c}" for k in dl.CF_ROME_KEYS if k != "case_id"}}
             for c in (1, 2, 3, 5, 7)]
    return root, json.dumps(union).encode()


def test_derived_subset_is_rebuilt_and_verified(rome_subsets, monkeypatch, capsys):
    root, expected = rome_subsets
    monkeypatch.setattr(dl, "RELEASE", {dl.DERIVED_CF: (sha256(expected), None)})
    assert dl.main(["--dest", str(root)]) == 0
    assert (root / dl.DERIVED_CF).read_bytes() == expected
    assert f"built       {dl.DERIVED_CF}" in capsys.readouterr().out


def test_derived_subset_with_another_digest_is_not_installed(rome_subsets, monkeypatch, capsys):
    root, expected = rome_subsets
    monkeypatch.setattr(dl, "RELEASE", {dl.DERIVED_CF: (sha256(expected + b" "), None)})
    assert dl.main(["--dest", str(root)]) == 1
    assert not (root / dl.DERIVED_CF).exists()
    err = capsys.readouterr().err
    assert dl.DERIVED_CF in err and sha256(expected) in err


def test_derived_subset_names_its_missing_inputs(rome_subsets, monkeypatch, capsys):
    root, expected = rome_subsets
    (root / dl.CF_ROME_SUBSETS[2]).unlink()
    monkeypatch.setattr(dl, "RELEASE", {dl.DERIVED_CF: (sha256(expected), None)})
    assert dl.main(["--dest", str(root)]) == 1
    assert not (root / dl.DERIVED_CF).exists()
    assert f"missing: {dl.CF_ROME_SUBSETS[2]}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Unverified sources and --list
# --------------------------------------------------------------------------------------------
@pytest.fixture
def extras(served, registry, monkeypatch):
    (served.root / "src" / "big.json").write_bytes(b"[1, 2, 3]")
    monkeypatch.setattr(dl, "EXTRA", {
        "counterfact/full.json": (None, f"{served.url}/src/big.json"),
        "zsre/eval.json": (sha256(b"published bytes"), f"{served.url}/src/big.json"),
    })


def test_list_marks_unverified_sources(served, extras, tmp_path, capsys):
    dest = tmp_path / "data"
    (dest / "zsre").mkdir(parents=True)
    (dest / "zsre" / "tiny.json").write_bytes(b"abc")
    (dest / "temporal").mkdir()
    (dest / "temporal" / "hello.json").write_bytes(b"edited")
    assert dl.main(["--dest", str(dest), "--list"]) == 0
    assert served.requests == []
    # "<state, 13 wide> <path>  <check>", then an indented source line
    rows = [line for line in capsys.readouterr().out.splitlines()
            if not line.startswith((" ", "data directory"))]
    state = {row[14:].split()[0]: row[:13].strip() for row in rows}
    check = {row[14:].split()[0]: row[14:].split(maxsplit=1)[1] for row in rows}
    assert state == {"zsre/tiny.json": "ok", "temporal/hello.json": "BAD CHECKSUM",
                     "counterfact/full.json": "missing", "zsre/eval.json": "missing"}
    assert check["counterfact/full.json"].startswith("UNVERIFIED")
    assert [rel for rel, text in check.items() if "UNVERIFIED" in text] == ["counterfact/full.json"]


def test_extras_need_the_flag_and_keep_their_checks(served, extras, tmp_path, capsys):
    dest = tmp_path / "data"
    assert dl.main(["--dest", str(dest), "--retries", "0"]) == 0
    assert "/src/big.json" not in served.requests
    capsys.readouterr()

    assert dl.main(["--dest", str(dest), "--extra", "--retries", "0"]) == 1
    out = capsys.readouterr().out
    # no digest known: installed, and reported as unverified with the digest of what arrived
    assert (dest / "counterfact" / "full.json").read_bytes() == b"[1, 2, 3]"
    assert f"UNVERIFIED  counterfact/full.json (downloaded; no known digest, its sha256 is " \
           f"{sha256(b'[1, 2, 3]')})" in out
    # a digest is known and differs: not installed
    assert not (dest / "zsre" / "eval.json").exists()
    assert "FAILED      zsre/eval.json" in out


# --------------------------------------------------------------------------------------------
# The real registry
# --------------------------------------------------------------------------------------------
def test_data_dir_defaults_to_the_apps(compose, tmp_path, monkeypatch):
    monkeypatch.delenv(dl.ENV_DATA_DIR, raising=False)
    assert dl.default_data_dir() == Path(compose([]).data_dir).resolve()
    monkeypatch.setenv(dl.ENV_DATA_DIR, str(tmp_path / "elsewhere"))
    assert dl.default_data_dir() == Path(compose([]).data_dir).resolve() == tmp_path / "elsewhere"


def test_sources_are_pinned_to_full_commits():
    pinned = re.compile(r"^https://(raw|media)\.githubusercontent\.com/(media/)?[^/]+/[^/]+/"
                        r"[0-9a-f]{40}/")
    sources = [url for _, url in dl.RELEASE.values() if url is not None]
    sources += [url for digest, url in dl.EXTRA.values() if digest is not None]
    assert len(sources) == len(dl.RELEASE) - 1 + 2  # all but the derived file; two LFS extras
    assert [url for url in sources if not pinned.match(url)] == []
    assert [rel for rel in dl.RELEASE if rel.split("/")[0] not in dl.GROUPS] == []


@pytest.mark.integration
def test_registry_matches_the_shared_data(shared_data):
    present = [rel for rel in dl.RELEASE if (shared_data / rel).is_file()]
    assert present, f"no registry file found under {shared_data}"
    actual = {rel: sha256((shared_data / rel).read_bytes()) for rel in present}
    assert actual == {rel: dl.RELEASE[rel][0] for rel in present}
    sums_file = shared_data / "SHA256SUMS"
    if sums_file.is_file():
        sums = dict(reversed(line.split()) for line in sums_file.read_text().splitlines() if line)
        assert sums == {rel: digest for rel, (digest, _) in dl.RELEASE.items()}


@pytest.mark.integration
def test_derivation_reproduces_the_release_file(shared_data):
    if not all((shared_data / rel).is_file() for rel in dl.CF_ROME_SUBSETS):
        pytest.skip(f"the ROME-format CounterFact subsets are not all under {shared_data}")
    built = dl.build_counterfact_rome_subset(shared_data)
    assert sha256(built) == dl.RELEASE[dl.DERIVED_CF][0]
