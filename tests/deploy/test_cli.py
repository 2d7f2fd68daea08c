"""The installed `epd` console script, run from outside the checkout as a user would."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EPD = Path(sys.executable).parent / "epd"


@pytest.mark.skipif(not EPD.exists(), reason="epd console script not installed in this environment")
@pytest.mark.parametrize("args, expected", [
    (["--help"], "generate"), (["up", "--help"], "--prefill"), (["router", "--help"], "--policy"),
    (["worker", "prefill", "--help"], "--transfer-option"), (["up", "--help"], "--transfer-option"),
    (["model", "create-tiny", "--help"], "directory"),
])
def test_console_script_commands(tmp_path: Path, args: list[str], expected: str) -> None:
    result = subprocess.run([str(EPD), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout


@pytest.mark.skipif(not EPD.exists(), reason="epd console script not installed in this environment")
def test_create_tiny_and_generate_from_outside_the_checkout(tmp_path: Path) -> None:
    created = subprocess.run([str(EPD), "model", "create-tiny", str(tmp_path / "tiny")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    out = subprocess.run([str(EPD), "generate", "--model", str(tmp_path / "tiny"), "--prompt", "Hello",
                          "--max-tokens", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "finish: " in out.stdout and "tokens: [" in out.stdout
    bad = subprocess.run([str(EPD), "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "model directory not found" in bad.stderr


@pytest.mark.skipif(not EPD.exists(), reason="epd console script not installed in this environment")
def test_create_tiny_vlm_is_byte_identical_and_loads(tmp_path: Path) -> None:
    import hashlib
    digests = []
    for name in ("a", "b"):
        made = subprocess.run([str(EPD), "model", "create-tiny-vlm", str(tmp_path / name), "--vision", "siglip"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((tmp_path / name).iterdir())})
    assert digests[0] == digests[1] and "preprocessor_config.json" in digests[0]
    from engine.multimodal import read_multimodal_info
    info = read_multimodal_info(tmp_path / "a")
    assert info is not None and info.image_token == "<image>" and info.num_image_tokens == 16
    bad = subprocess.run([str(EPD), "model", "create-tiny-vlm", str(tmp_path / "c"), "--vision", "vit"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
