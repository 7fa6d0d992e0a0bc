"""The README's configuration table is the CLI's own: regenerate it when flags change."""

from __future__ import annotations

from pathlib import Path

from metal_agent.cli.main import app
from metal_agent.cli.reference import BEGIN, END, render_block

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_reference_matches_the_cli():
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == render_block(app), (
        "README configuration table is stale: run `python scripts/update_readme.py`"
    )


def test_readme_field_table_matches_core_fields():
    """The table of what the agent does with each LLMKube field is `core.fields`' own."""
    from metal_agent.core import fields

    text = README.read_text()
    start, end = text.index(fields.BEGIN), text.index(fields.END) + len(fields.END)
    assert text[start:end] == fields.render_block(), (
        "README spec field table is stale: run `python scripts/update_readme.py`"
    )
