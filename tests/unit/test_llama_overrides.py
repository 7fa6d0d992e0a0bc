"""tensorOverrides / metadataOverrides as build 11434 reads them: said once, joined, quoted where
`parse_csv_row` needs it, and refused where llama-server would split, misread or reject them."""

from __future__ import annotations

import pytest

from metal_agent.core.llama_overrides import (
    kv_override_problem,
    kv_overrides_value,
    tensor_override_problem,
    tensor_overrides_value,
)


def parse_csv_row(value: str) -> list[str]:
    """build 11434's `parse_csv_row` (common/arg.cpp), transcribed to check what our joined value reads as."""
    fields, field, quoted, i = [], "", False, 0
    while i < len(value):
        ch = value[i]
        if ch == '"':
            if not quoted:
                if field:
                    field += '"'
                else:
                    quoted = True
            elif value[i + 1:i + 2] == '"':
                field += '"'
                i += 1
            else:
                quoted = False
        elif ch == "," and not quoted:
            fields.append(field)
            field = ""
        else:
            field += ch
        i += 1
    return [*fields, field]


@pytest.mark.parametrize("items", [
    ("a=int:1",),
    ("a=int:1", "b=bool:false", "c=float:0.5"),
    ("general.name=str:Tiny, v2, final", 'q=str:say "hi", then go', 'x=str:"', "e=str:"),
    ('"odd=str:key starts with a quote',),
])
def test_the_joined_metadata_value_reads_back_as_the_items(items):
    assert parse_csv_row(kv_overrides_value(items)) == list(items)


def test_tensor_overrides_join_with_commas():
    assert tensor_overrides_value(("exps=CPU", "token_embd=CPU")) == "exps=CPU,token_embd=CPU"


@pytest.mark.parametrize(("item", "words"), [
    ("a=1", "of the form key=type:value"),
    ("a=int:ten", "read it as 0"),
    ("a=int:12abc", "read it as 12"),
    ("a=int:99999999999999999999", "64 bits"),
    ("a=float:x", "not a number"),
    ("a=bool:yes", "true or false"),
    ("a=str:" + "é" * 64, "128 bytes"),
    ("k" * 128 + "=str:x", "128 bytes"),
])
def test_a_metadata_override_llama_server_would_misread_is_refused_saying_why(item, words):
    assert words in (kv_override_problem(item) or "")


@pytest.mark.parametrize("item", ["a=int:-3", "a=float:1e-3", "a=float:.5", "a=float:inf", "a=bool:true",
                                  "a=str:" + "x" * 127, "a=str:with, commas", "a=str:"])
def test_what_llama_server_reads_as_written_is_accepted(item):
    assert kv_override_problem(item) is None


@pytest.mark.parametrize(("item", "words"), [
    ("blk\\.{1,3}\\.ffn=CPU", "comma"),
    ("exps=CPU,token_embd=CPU", "comma"),
    ("a=b=CPU", "second '='"),
    ("=CPU", "of the form"),
])
def test_a_tensor_override_that_cannot_be_said_is_refused(item, words):
    assert words in (tensor_override_problem(item) or "")
    assert tensor_override_problem("blk\\.[0-9]+\\.ffn_.*_exps=CPU") is None
