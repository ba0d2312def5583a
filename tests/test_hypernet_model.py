"""The hypernetwork: official checkpoints, our safetensors format, conversion, the catalog."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading

import pytest
import torch

from hypernet import catalog
from hypernet.errors import HypernetError
from hypernet.model import HypernetConfig, HyperNetwork, load_hypernet, official_state_dict, save_hypernet


def test_official_checkpoint_loads_with_its_real_layout(official_sdxl_path):
    model = load_hypernet(official_sdxl_path, expected_sha256=catalog.load_catalog()["lorarar-sdxl"].sha256)
    assert sum(p.numel() for p in model.parameters()) == 492_034
    assert model.widths == (640, 1280) and model.config.hidden == 128
    raw = torch.load(official_sdxl_path, weights_only=True, map_location="cpu")
    assert torch.equal(model.input["640"].weight, raw["input_1.weight"])
    assert torch.equal(model.input["1280"].bias, raw["input_2.bias"])
    # H is the plain MLP: input Linear → ReLU → output.1, no output nonlinearity
    x = torch.randn(5, 1280)
    expected = torch.relu(x @ raw["input_1.weight"].T + raw["input_1.bias"]) @ raw["output.1.weight"].T + raw["output.1.bias"]
    torch.testing.assert_close(model(x), expected)


def test_official_to_ours_and_back_loses_nothing(official_sdxl_path, tmp_path):
    from hypernet.cli import main

    ours = tmp_path / "sdxl.safetensors"
    assert main(["convert-hypernet", str(official_sdxl_path), str(ours)]) == 0
    model = load_hypernet(ours)
    assert model.config.license.startswith("CC BY-NC-SA 4.0") and model.config.base_family == "sdxl"
    assert model.config.name == "lorarar-sdxl"
    back = tmp_path / "back.pth"
    assert main(["convert-hypernet", str(ours), str(back)]) == 0
    original = torch.load(official_sdxl_path, weights_only=True, map_location="cpu")
    again = torch.load(back, weights_only=True, map_location="cpu")
    assert list(original) == list(again)
    assert all(torch.equal(original[k].cpu(), again[k]) for k in original)
    assert main(["convert-hypernet", str(ours), str(back)]) == 1  # exists: refused


def test_our_format_records_its_config(tmp_path):
    config = HypernetConfig(hidden=16, widths=(320, 640, 1280), base_family="sd15", name="mine",
                            license="CC0", extra={"steps": "300"})
    model = HyperNetwork(config)
    path = save_hypernet(model, tmp_path / "mine.safetensors")
    loaded = load_hypernet(path)
    assert loaded.config == config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "lorarar-hypernet" and meta["format_version"] == "1"
    assert meta["widths"] == "320,640,1280" and meta["targets"] == "to_q,to_out.0"


def test_wrong_shapes_are_refused(tmp_path):
    sd = official_state_dict(HyperNetwork(HypernetConfig()))
    sd["output.1.weight"] = torch.zeros(3, 128)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(HypernetError, match=r"bad\.pth: output\.1 has the wrong shape"):
        load_hypernet(tmp_path / "bad.pth")
    sd = official_state_dict(HyperNetwork(HypernetConfig()))
    sd["input_1.weight"] = torch.zeros(64, 1280)
    torch.save(sd, tmp_path / "bad2.pth")
    with pytest.raises(HypernetError, match="input_1 has the wrong shape"):
        load_hypernet(tmp_path / "bad2.pth")
    # our format whose tensors disagree with the metadata
    from safetensors.torch import save_file
    model = HyperNetwork(HypernetConfig(hidden=8))
    tensors = dict(model.state_dict())
    tensors["input.640.weight"] = torch.zeros(8, 10)
    save_file(tensors, str(tmp_path / "bad.safetensors"), model.config.to_metadata())
    with pytest.raises(HypernetError, match="do not match its metadata"):
        load_hypernet(tmp_path / "bad.safetensors")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"input_1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(HypernetError, match="weights-only"):
        load_hypernet(tmp_path / "evil.pth")
    assert not marker.exists()


def test_bad_sha256_is_refused(random_hypernet_pth):
    with pytest.raises(HypernetError, match="sha256 is .* expected 0000"):
        load_hypernet(random_hypernet_pth, expected_sha256="0" * 64)


def test_catalog_matches_the_design_facts():
    entries = catalog.load_catalog()
    sdxl = entries["lorarar-sdxl"]
    assert sdxl.sha256 == "0cfa9772a0c56020a38c0bebd33834703cf915ead96136cf316be5b27e933b05"
    assert sdxl.bytes == 1_970_898 and "CC BY-NC-SA 4.0" in sdxl.license
    assert sdxl.url.endswith("donaldssh/LoRA.rar/raw/main/models/hypernet.pth")
    assert entries["lorarar-koala-700m"].url.endswith("models/koala_700m_hypernet.pth")
    # the pack never ships the official weights
    assert not list(catalog.PACK_WEIGHTS_DIR.glob("*.pth"))


def test_resolver_finds_a_checkpoint_in_a_folder(official_sdxl_path, tmp_path, monkeypatch):
    monkeypatch.setenv("LORARAR_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HypernetError, match="not found in .*allow its download"):
        catalog.resolve_hypernet("lorarar-sdxl", [tmp_path])
    shutil.copy(official_sdxl_path, tmp_path / "lorarar_sdxl_hypernet.pth")
    model = catalog.resolve_hypernet("lorarar-sdxl", [tmp_path])
    assert model.config.name == "lorarar-sdxl"
    with pytest.raises(HypernetError, match="neither a file nor a known name"):
        catalog.resolve_hypernet("no-such-net")


class _OneFile(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def file_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneFile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_download_needs_consent_and_verifies_sha256(official_sdxl_path, tmp_path, file_server):
    entry = catalog.load_catalog()["lorarar-sdxl"]
    url = f"http://127.0.0.1:{file_server.server_port}/hypernet.pth"
    with pytest.raises(HypernetError, match="CC BY-NC-SA 4.0.*explicit agreement"):
        catalog.download(entry, tmp_path, accept_license=False, url=url)
    # a damaged download is rejected and leaves nothing behind
    _OneFile.payload = b"x" * entry.bytes
    with pytest.raises(HypernetError, match="sha256"):
        catalog.download(entry, tmp_path, accept_license=True, url=url)
    assert not list(tmp_path.iterdir())
    _OneFile.payload = official_sdxl_path.read_bytes()
    seen = []
    path = catalog.download(entry, tmp_path, accept_license=True, url=url, progress=lambda d, t: seen.append(d))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    assert seen[-1] == entry.bytes
    assert load_hypernet(path).widths == (640, 1280)
