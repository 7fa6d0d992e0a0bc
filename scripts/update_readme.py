"""Regenerate the README's generated tables: `metal-agent run`'s options, the spec field table and the Go agent's flags."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from metal_agent.cli.main import app  # noqa: E402
from metal_agent.cli.reference import BEGIN, END, render_block  # noqa: E402
from metal_agent.core import fields  # noqa: E402
from metal_agent.core.go_flags import markdown_table  # noqa: E402

GO_BEGIN, GO_END = "<!-- BEGIN go-flags (metal_agent.core.go_flags.markdown_table) -->", "<!-- END go-flags -->"


def replace_block(text: str, begin: str, end: str, block: str) -> str:
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + block + text[stop:]


readme = REPO / "README.md"
text = replace_block(readme.read_text(), BEGIN, END, render_block(app))
text = replace_block(text, fields.BEGIN, fields.END, fields.render_block())
text = replace_block(text, GO_BEGIN, GO_END, f"{GO_BEGIN}\n{markdown_table()}\n{GO_END}")
readme.write_text(text)
print("README.md configuration, spec field and Go flag tables updated")
