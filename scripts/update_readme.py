"""Regenerate the README's configuration table from `metal-agent run`'s own options."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from metal_agent.cli.main import app  # noqa: E402
from metal_agent.cli.reference import BEGIN, END, render_block  # noqa: E402

readme = REPO / "README.md"
text = readme.read_text()
start, end = text.index(BEGIN), text.index(END) + len(END)
readme.write_text(text[:start] + render_block(app) + text[end:])
print("README.md configuration table updated")
