"""The model catalog (``med3d models``) and resumable downloads, against a local HTTP server on 127.0.0.1 only:
interrupted transfer and resume, wrong size, changed bytes, 404, a stalled server and a timeout, a proxy from the
environment; and one MedicalNet-layout file served locally, pulled, checked and fine-tuned from by name."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from med3dcore import catalog
from med3dcore.cli import main
from med3dcore.downloads import fetch, partial_path
from med3dcore.errors import Med3DError

PAYLOAD = bytes(range(256)) * 12000  # ~3 MB: several 1 MiB chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``/files/<name>`` with Range support. ``fault``: ``cut`` sends a third and hangs up, ``stall`` a third
    and then nothing, ``norange`` ignores Range. Records every request (path, Range header, host via a proxy)."""

    files: dict = {}
    requests: list = []
    fault = None
    stall_s = 3.0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        url = urllib.parse.urlparse(self.path)
        type(self).requests.append({"path": url.path, "host": url.netloc, "range": self.headers.get("Range")})
        folder, _, name = url.path.lstrip("/").partition("/")
        body = self.files.get(name)
        kind = self.fault
        if body is None or folder != "files":
            self.send_error(404, "Not Found")
            return
        start = 0
        ranged = self.headers.get("Range")
        if ranged and kind != "norange":
            start = int(ranged.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        part = body[start:]
        if kind in ("cut", "stall"):
            self.wfile.write(part[:len(body) // 3])
            self.wfile.flush()
            if kind == "stall":
                time.sleep(self.stall_s)
            self.close_connection = True
            return
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def served(monkeypatch):
    _Handler.files = {"w.pth": PAYLOAD}
    _Handler.requests = []
    _Handler.fault = None
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY", catalog.MIRROR_ENV):
        monkeypatch.delenv(name, raising=False)


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(Med3DError, match=r"broke off|incomplete.*run the same command again to resume"):
        _Handler.fault = "cut"
        fetch(f"{server}/files/w.pth", dest)
    assert not dest.exists()
    kept = partial_path(dest).stat().st_size
    assert kept == len(PAYLOAD) // 3
    events = []
    _Handler.fault = None
    path, sha = fetch(f"{server}/files/w.pth", dest, reporter=events.append)
    assert path.read_bytes() == PAYLOAD and sha == SHA
    # the second request asked only for the rest; nothing partial is left; progress counts from the kept bytes
    assert _Handler.requests[-1]["range"] == f"bytes={kept}-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]
    assert events[0]["step"] > kept and events[-1]["step"] == events[-1]["total"] == len(PAYLOAD)
    assert events[-1]["unit"] == "B"


def test_resume_of_a_changed_url_or_a_server_without_ranges_starts_over(server, tmp_path):
    dest = tmp_path / "w.pth"
    _Handler.fault = "cut"
    with pytest.raises(Med3DError):
        fetch(f"{server}/files/w.pth", dest)
    # a server that ignores Range sends the whole file (200): the partial bytes must not be prepended
    _Handler.fault = "norange"
    path, sha = fetch(f"{server}/files/w.pth", dest)
    assert _Handler.requests[-1]["range"] is not None
    assert sha == SHA and path.read_bytes() == PAYLOAD


def test_wrong_size_is_refused_before_the_transfer(server, tmp_path):
    with pytest.raises(Med3DError, match=f"offers {len(PAYLOAD)} bytes, but w.pth has 123; .*nothing was kept"):
        fetch(f"{server}/files/w.pth", tmp_path / "w.pth", size=123)
    assert list(tmp_path.iterdir()) == []
    assert len(_Handler.requests) == 1


def test_changed_bytes_fail_the_checksum_and_leave_nothing(server, tmp_path):
    _Handler.files["w.pth"] = PAYLOAD[:-1] + b"\x00"  # same size, one byte changed
    with pytest.raises(Med3DError, match=f"checksum mismatch .*expected sha256 {SHA}"):
        fetch(f"{server}/files/w.pth", tmp_path / "w.pth", sha256=SHA, size=len(PAYLOAD))
    assert list(tmp_path.iterdir()) == []


def test_not_found(server, tmp_path):
    with pytest.raises(Med3DError, match=r"download of .*/files/nothing.pth failed: HTTP 404 Not Found"):
        fetch(f"{server}/files/nothing.pth", tmp_path / "w.pth")
    assert list(tmp_path.iterdir()) == []


def test_stalled_server_times_out_and_the_download_resumes_later(server, tmp_path):
    dest = tmp_path / "w.pth"
    started = time.monotonic()
    _Handler.fault = "stall"
    with pytest.raises(Med3DError, match=r"broke off after \d+ of \d+ bytes \(no data for 0.5 s\).*resume"):
        fetch(f"{server}/files/w.pth", dest, timeout=0.5)
    assert time.monotonic() - started < _Handler.stall_s  # gave up at the timeout, not when the server hung up
    assert partial_path(dest).stat().st_size == len(PAYLOAD) // 3
    _Handler.fault = None
    assert fetch(f"{server}/files/w.pth", dest)[1] == SHA
    assert _Handler.requests[-1]["range"] == f"bytes={len(PAYLOAD) // 3}-"


def test_proxy_from_the_environment(server, tmp_path, monkeypatch):
    # The "proxy" is our server: a request for another host arrives there with its absolute URL.
    monkeypatch.setenv("http_proxy", server)
    path, sha = fetch("http://weights.example.invalid/files/w.pth", tmp_path / "w.pth")
    assert sha == SHA
    assert _Handler.requests[-1]["host"] == "weights.example.invalid"


def test_existing_destination_is_never_replaced(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"mine")
    with pytest.raises(Med3DError, match="already exists; remove it first"):
        fetch(f"{server}/files/w.pth", dest)
    assert dest.read_bytes() == b"mine"


# ------------------------------------------------------------------------------------------------ the catalog

@pytest.fixture(scope="module")
def medicalnet_file(tmp_path_factory):
    """A real MedicalNet-layout ResNet-10 (shortcut B) file, as Tencent's release is laid out."""
    import torch

    from med3dcore.nets import resnet3d
    from med3dcore.medicalnet import export_medicalnet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("release") / "resnet_10.pth"
    export_medicalnet(resnet3d(10, "B", num_seg_classes=None), path)
    return path


@pytest.fixture
def local_catalog(server, medicalnet_file, monkeypatch, tmp_path):
    """The catalog's ResNet-10 entry served by the local server, with this file's size and checksum."""
    data = medicalnet_file.read_bytes()
    _Handler.files = {"resnet_10.pth": data, "resnet_18.pth": data}
    entry = dataclasses.replace(catalog.find_known("medicalnet-resnet10"), size=len(data),
                                sha256=hashlib.sha256(data).hexdigest())
    wrong = dataclasses.replace(catalog.find_known("medicalnet-resnet18"), size=len(data), sha256=None)
    monkeypatch.setattr(catalog, "KNOWN_MODELS", (entry, wrong))
    monkeypatch.setenv(catalog.MIRROR_ENV, server + "/files/")  # a site's mirror: <mirror>/<file name>
    folder = tmp_path / "models"
    monkeypatch.setenv("MED3D_MODELS", str(folder))
    return folder


def test_table_lists_every_published_file(monkeypatch):
    names = {m.name: m for m in catalog.KNOWN_MODELS}
    assert sorted(m.depth for m in names.values() if "-23datasets" not in m.name) == [10, 18, 34, 50, 101, 152, 200]
    assert sorted(m.depth for m in names.values() if "-23datasets" in m.name) == [10, 18, 34, 50]
    assert {m.depth: m.shortcut_type for m in names.values()} == {10: "B", 18: "A", 34: "A", 50: "B", 101: "B",
                                                                   152: "B", 200: "B"}
    m = names["medicalnet-resnet50-23datasets"]
    assert m.url == ("https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet50/resolve/main/"
                     "resnet_50_23dataset.pth")
    assert m.size == 184885051 and len(m.sha256) == 64 and m.licence == "MIT"
    monkeypatch.setenv(catalog.MIRROR_ENV, "https://intranet.example/medicalnet/")
    assert m.url == "https://intranet.example/medicalnet/resnet_50_23dataset.pth"
    assert all(m.sha256 is None or len(m.sha256) == 64 for m in names.values())


def test_pull_checks_records_and_lists(local_catalog, capsys):
    assert main(["models", "pull", "medicalnet-resnet10", "--progress", "none"]) == 0
    path = local_catalog / "resnet_10.pth"
    record = json.loads((local_catalog / catalog.RECORD_NAME).read_text())
    assert record["resnet_10.pth"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["resnet_10.pth"]["how"] == "pulled"
    capsys.readouterr()
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["medicalnet-resnet10"]["state"] == "downloaded" and rows["medicalnet-resnet18"]["state"] == "missing"
    # a second pull downloads nothing
    before = len(_Handler.requests)
    assert main(["models", "pull", "medicalnet-resnet10", "--progress", "none"]) == 0
    assert len(_Handler.requests) == before


def test_pull_refuses_a_file_of_another_network(local_catalog, capsys):
    # The "ResNet-18" entry is served a ResNet-10 file: size fits, the network does not.
    assert main(["models", "pull", "medicalnet-resnet18", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "holds ResNet-10, shortcut B, not medicalnet-resnet18 (ResNet-18, shortcut A)" in err
    assert not local_catalog.joinpath("resnet_18.pth").exists()
    assert [p.name for p in local_catalog.iterdir()] == []


def test_changed_file_on_disk_is_refused_before_training(local_catalog):
    catalog.pull("medicalnet-resnet10")
    path = local_catalog / "resnet_10.pth"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Med3DError, match="changed since it was pulled .*med3d models remove medicalnet-resnet10"):
        catalog.resolve("medicalnet-resnet10")


def test_not_yet_downloaded_says_how_to_get_it(local_catalog):
    with pytest.raises(Med3DError, match="not in .* yet: download it with 'med3d models pull medicalnet-resnet10'"):
        catalog.resolve("medicalnet-resnet10")
    assert catalog.resolve("scratch") is None


def test_offline_import_and_remove(local_catalog, medicalnet_file, capsys, tmp_path):
    assert main(["models", "import", str(medicalnet_file)]) == 0
    assert (local_catalog / "resnet_10.pth").read_bytes() == medicalnet_file.read_bytes()
    assert json.loads((local_catalog / catalog.RECORD_NAME).read_text())["resnet_10.pth"]["how"] == "imported"
    # a file that is not the published one (other bytes) is refused
    other = tmp_path / "resnet_10.pth"
    other.write_bytes(medicalnet_file.read_bytes()[:-10])
    assert main(["models", "import", str(other), "--name", "medicalnet-resnet10"]) == 2
    assert "not the published file" in capsys.readouterr().err
    assert main(["models", "remove", "medicalnet-resnet10"]) == 0
    assert not (local_catalog / "resnet_10.pth").exists()
    assert "resnet_10.pth" not in json.loads((local_catalog / catalog.RECORD_NAME).read_text())
    assert main(["models", "remove", "medicalnet-resnet10"]) == 2
    assert main(["models", "pull", "no-such-model"]) == 2
    assert "not in the model catalog; known: medicalnet-resnet10" in capsys.readouterr().err


@pytest.mark.slow
def test_finetune_from_a_pulled_catalog_model_by_name(local_catalog, capsys, tmp_path):
    """The Must-show path: pull over HTTP, check, then `med3d finetune --init <catalog name>` (a tiny run)."""
    from med3dcore.phantoms import make_ct_phantom
    from med3dcore.volume_files import write_volume
    from med3dcore.bundles import load_bundle

    assert main(["models", "pull", "medicalnet-resnet10", "--progress", "none"]) == 0
    for folder in ("img", "lab"):
        (tmp_path / folder).mkdir()
    for c in range(2):
        image, labels, _ = make_ct_phantom(shape=(16, 32, 32), spacing=(3.0, 3.0, 4.0), seed=c)
        write_volume(image, tmp_path / "img" / f"c{c}.nii.gz")
        write_volume(labels.with_array(np.isin(labels.array, (1, 5)).astype(np.uint8)), tmp_path / "lab" / f"c{c}.nii.gz")
    code = main(["finetune", "--task", "lung", "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
                 "--init", "medicalnet-resnet10", "--out", str(tmp_path / "out"), "--name", "lung", "--steps", "2",
                 "--batch-size", "1", "--patch", "16,32,32", "--val-fraction", "0", "--progress", "none",
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    bundle = load_bundle(tmp_path / "out" / "lung.pt")
    assert bundle.architecture["backbone"] == {"depth": 10, "shortcut_type": "B", "preact": False}
    record = json.loads((local_catalog / catalog.RECORD_NAME).read_text())
    assert bundle.provenance["init"] == str(local_catalog / "resnet_10.pth")
    assert record["resnet_10.pth"]["sha256"] == hashlib.sha256((local_catalog / "resnet_10.pth").read_bytes()).hexdigest()
