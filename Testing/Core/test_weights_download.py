"""download_weights against a local HTTP server on 127.0.0.1 (no other network)."""
from __future__ import annotations

import hashlib
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from med3dcore.downloads import download_weights
from med3dcore.errors import Med3DError

PAYLOAD = bytes(range(256)) * 9000  # ~2.3 MB: several 1 MiB chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(SimpleHTTPRequestHandler):
    hits = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).hits += 1
        if self.path == "/weights.pth":
            body = PAYLOAD
        elif self.path == "/short.pth":  # announces more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            self.close_connection = True
            return
        else:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_download_checks_checksum_and_reports_progress(server, tmp_path):
    events = []
    dest = tmp_path / "resnet_10.pth"
    assert download_weights(f"{server}/weights.pth", dest, sha256=SHA.upper(), reporter=events.append) == dest
    assert dest.read_bytes() == PAYLOAD
    assert [p.name for p in tmp_path.iterdir()] == ["resnet_10.pth"]
    assert all(e["stage"] == "download" and e["total"] == len(PAYLOAD) for e in events)
    assert [e["step"] for e in events] == sorted(e["step"] for e in events) and events[-1]["step"] == len(PAYLOAD)
    assert len(events) >= 3  # streamed in chunks, not read whole


def test_existing_file_with_matching_checksum_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(PAYLOAD)
    before = _Handler.hits
    assert download_weights(f"{server}/weights.pth", dest, sha256=SHA) == dest
    assert _Handler.hits == before


def test_existing_file_with_other_checksum_is_kept_and_refused(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"my own file")
    with pytest.raises(Med3DError, match="already exists with a different checksum than expected; delete it"):
        download_weights(f"{server}/weights.pth", dest, sha256=SHA)
    assert dest.read_bytes() == b"my own file"


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(Med3DError, match=f"checksum mismatch .*expected sha256 {'0' * 64}, got {SHA}"):
        download_weights(f"{server}/weights.pth", dest, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_http_error(server, tmp_path):
    with pytest.raises(Med3DError, match="download of .*/missing.pth failed: HTTP 404 Not Found"):
        download_weights(f"{server}/missing.pth", tmp_path / "w.pth")
    assert list(tmp_path.iterdir()) == []


def test_connection_cut_short_keeps_the_bytes_for_a_resume(server, tmp_path):
    with pytest.raises(Med3DError, match="(broke off|is incomplete).*run the same command again to resume"):
        download_weights(f"{server}/short.pth", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()  # nothing half-written under the real name
    assert (tmp_path / ".w.pth.partial").read_bytes() == PAYLOAD[:1000]  # kept for the resume (Range request)
    with pytest.raises(Med3DError, match="checksum mismatch"):  # resume=False starts over, then the check fails
        download_weights(f"{server}/weights.pth", tmp_path / "w.pth", sha256="0" * 64, resume=False)
    assert list(tmp_path.iterdir()) == []


def test_no_network(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on: connection refused, like an offline site
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(Med3DError, match="cannot reach .*check the network connection .*proxy settings.* or download it by hand "
                                         "and place it at"):
        download_weights(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w.pth", timeout=5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url,sha,message", [
    ("ftp://example.org/w.pth", None, "give an http\\(s\\):// or file:// address"),
    ("http://127.0.0.1:9/w.pth", "abc", "is not a SHA-256 checksum"),
])
def test_bad_arguments(tmp_path, url, sha, message):
    with pytest.raises(Med3DError, match=message):
        download_weights(url, tmp_path / "w.pth", sha256=sha)


def test_missing_destination_folder(server, tmp_path):
    with pytest.raises(Med3DError, match="folder .*nowhere does not exist"):
        download_weights(f"{server}/weights.pth", tmp_path / "nowhere" / "w.pth")


def test_file_url_for_offline_sites(tmp_path):
    source = tmp_path / "share" / "w.pth"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    dest_dir = tmp_path / "models"
    dest_dir.mkdir()
    dest = download_weights(source.as_uri(), dest_dir / "w.pth", sha256=SHA)
    assert dest.read_bytes() == PAYLOAD
