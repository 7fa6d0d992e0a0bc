"""Where macOS privacy protection (TCC) refuses a model file, and what the condition then says.

Launchd's agents get EPERM for files under ~/Desktop, ~/Documents,
~/Downloads and on volumes in /Volumes unless granted Full Disk Access; the
message must name the folder, say it is TCC, and give both fixes. The real
refusal (a PermissionError from the kernel) is exercised in
tests/integration/test_model_privacy_eperm.py.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from metal_agent.adapters.local_models import privacy_hint, privacy_protected_folder

HOME = "/Users/me"


@pytest.mark.parametrize("path,folder", [
    ("/Users/me/Downloads/qwen.gguf", "~/Downloads"),
    ("/Users/me/Documents/models/q/qwen.gguf", "~/Documents"),
    ("/Users/me/Desktop/qwen.gguf", "~/Desktop"),
    ("/Users/me/Downloads", "~/Downloads"),
    ("/Volumes/T7 Shield/models/qwen.gguf", "/Volumes/T7 Shield"),
    ("/Users/me/Downloads/../Library/Caches/q.gguf", None),  # normalised: not in Downloads at all
    ("/Users/me/Downloads2/qwen.gguf", None),
    ("/Users/me/Library/Caches/metal-agent/models/q.gguf", None),
    ("/Users/other/Downloads/qwen.gguf", None),  # someone else's: not the agent user's protected folder
    ("/Volumes", None),
    ("/opt/models/qwen.gguf", None),
])  # fmt: skip
def test_protected_folders(path, folder):
    assert privacy_protected_folder(path, HOME) == folder


def test_a_link_into_downloads_counts(tmp_path: Path):
    """TCC judges the file opened, so a link from an open folder into ~/Downloads is refused too."""
    (tmp_path / "Downloads").mkdir()
    (tmp_path / "Downloads" / "q.gguf").write_bytes(b"GGUF")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "q.gguf").symlink_to(tmp_path / "Downloads" / "q.gguf")
    assert privacy_protected_folder(tmp_path / "models" / "q.gguf", tmp_path) == "~/Downloads"
    assert privacy_protected_folder(tmp_path / "models", tmp_path) is None


@pytest.mark.parametrize("path,where", [
    ("/Users/me/Downloads/q.gguf", "~/Downloads"),
    ("/Volumes/T7/q.gguf", "the volume /Volumes/T7"),
])  # fmt: skip
def test_hint_names_the_folder_tcc_and_both_fixes(path, where):
    hint = privacy_hint(path, HOME)
    assert hint.startswith(f"{where} is protected by macOS privacy protection (TCC)")
    assert f"move the model out of {where}" in hint and "update spec.source" in hint
    assert "Full Disk Access" in hint
    assert f"the agent's Python ({os.path.realpath(sys.executable)})" in hint and "and to llama-server" in hint


def test_no_hint_outside_protected_folders():
    assert privacy_hint("/Users/me/models/q.gguf", HOME) is None
