"""The pipeline's HTML report renders in a real headless browser (Debian chromium)."""

from __future__ import annotations

import shutil
import subprocess
import zlib

import pytest
import torch

from exporters.demo_models import tiny_llama
from exporters.pipelines import pipeline


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian chromium is required for this test: run scripts/setup.sh (apt-get install chromium)"
    return path


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    model, _ = tiny_llama(layers=1, hidden=32)
    with torch.no_grad():  # trained-adapter-sized deltas (random init_lora_weights=False ones are huge)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    return pipeline("builtin:tiny-llama", {}, out, quantize="w8a16", quiet=True, model=model)


def test_pipeline_verifies_every_adapter(run):
    assert run.passed, run.table()
    assert [c.adapter for c in run.checks] == ["(base)", "default", "second"]
    assert all(c.float_max_abs <= 1e-4 for c in run.checks)
    assert all(c.qdq_cosine is not None and c.qdq_cosine > 0.99 for c in run.checks)
    assert any(c.layer_errors for c in run.checks if c.adapter != "(base)")


def _png_pixels_vary(data: bytes) -> bool:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return len(set(raw[:200000])) > 8


def test_report_renders_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    url = run.report_path.resolve().as_uri()
    profile = tmp_path / "profile"
    dom = subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "Verification PASSED" in page
    for ident in ("sites-per-layer", "quant-error", "file-sizes", "latency"):
        assert f'id="{ident}"' in page, ident
    assert "model.layers.0.self_attn.q_proj" in page and "<svg" in page
    shot = tmp_path / "report.png"
    res = subprocess.run([browser, *_FLAGS, f"--user-data-dir={profile}2", f"--screenshot={shot}",
                          "--window-size=1200,1800", url], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    assert _png_pixels_vary(shot.read_bytes())  # something was drawn, not a blank page
