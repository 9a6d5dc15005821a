"""Text files, the train/val split, and the downloader (against a server on 127.0.0.1)."""

import hashlib
import http.server
import threading
from contextlib import contextmanager

import pytest

from conftest import SHARED_DATA
from minigpt.data import DATASETS, download, fetch, load_text, sha256_file, train_val_split

PAYLOAD = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200).encode()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        self.server.hits += 1
        if self.path == "/corpus.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/broken":
            self.send_error(500, "Internal Server Error")
        else:
            self.send_error(404, "Not Found")

    def log_message(self, *args):
        pass


@contextmanager
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_then_cache_hit_with_the_server_stopped(tmp_path):
    with local_server() as (server, base):
        path = download(f"{base}/corpus.txt", PAYLOAD_SHA, tmp_path)
        assert path.read_bytes() == PAYLOAD and server.hits == 1
        url = f"{base}/corpus.txt"
    # the server is gone: a second call must not touch the network
    again = download(url, PAYLOAD_SHA, tmp_path)
    assert again == path and again.read_bytes() == PAYLOAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path):
    wrong = "0" * 64
    with local_server() as (_, base):
        with pytest.raises(ValueError, match=f"expected {wrong}"):
            download(f"{base}/corpus.txt", wrong, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_cache_file_is_downloaded_again(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(b"half a file")
    with local_server() as (server, base):
        path = download(f"{base}/corpus.txt", PAYLOAD_SHA, tmp_path)
        assert server.hits == 1 and path.read_bytes() == PAYLOAD


@pytest.mark.parametrize("route, status", [("/broken", "500"), ("/missing.txt", "404")])
def test_server_errors_are_clear(tmp_path, route, status):
    with local_server() as (_, base):
        with pytest.raises(OSError, match=f"{route}.*{status}"):
            download(f"{base}{route}", PAYLOAD_SHA, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_clear(tmp_path):
    with local_server() as (_, base):
        url = f"{base}/corpus.txt"
    with pytest.raises(OSError, match="download of http://127.0.0.1"):
        download(url, PAYLOAD_SHA, tmp_path, timeout=5)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sha256='abc'"):
        download("http://127.0.0.1:1/x", "abc", tmp_path)
    with pytest.raises(ValueError, match="unknown corpus 'shakespeare'.*tinyshakespeare"):
        fetch("shakespeare", tmp_path)


def test_tiny_shakespeare_entry_matches_the_shared_checksum():
    sums = SHARED_DATA / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip(f"{sums} not found (the shared data folder is absent)")
    published = dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())
    entry = DATASETS["tinyshakespeare"]
    assert entry.sha256 == published["tinyshakespeare.txt"]
    local = SHARED_DATA / "tinyshakespeare.txt"
    assert sha256_file(local) == entry.sha256 and local.stat().st_size == entry.size_bytes


def test_fetch_uses_the_cache(tmp_path, shakespeare_text):
    (tmp_path / "tinyshakespeare.txt").write_text(shakespeare_text, encoding="utf-8")
    path = fetch("tinyshakespeare", tmp_path)  # no network: the cached copy matches its SHA256
    assert load_text(path) == shakespeare_text


def test_load_text(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("héllo\nworld", encoding="utf-8")
    assert load_text(good) == "héllo\nworld"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8.*0xe9 at offset 3"):
        load_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text(empty)
    with pytest.raises(ValueError, match="nothere.txt is not a file"):
        load_text(tmp_path / "nothere.txt")


def test_train_val_split():
    train, val = train_val_split("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    assert train_val_split("ab", 0.01) == ("a", "b")
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"val_fraction={bad}"):
            train_val_split("abc", bad)
    with pytest.raises(ValueError, match="too short"):
        train_val_split("a")
