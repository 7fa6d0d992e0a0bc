"""The extraArgs allowlist covers every option the pinned llama-server has.

`core.llama_options` classifies each option of the build the tests run
(scripts/build-llama-server.sh). A llama.cpp upgrade that adds an option must
not let it slip through unclassified: this parses the binary's `--help` and
fails on any option in neither the allowed nor the refused rows (an unknown
option is refused anyway, but then honest users hit a refusal no one chose).
"""

from __future__ import annotations

import re
import subprocess

from metal_agent.core.llama_options import LLAMA_SERVER_OPTIONS

_NAME = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9_.-]*")
_SEPARATOR = re.compile(r",\s*")


def help_options(help_text: str) -> set[str]:
    """Every option spelling `llama-server --help` lists (each option's first column: `-t,    --threads N`)."""
    names: set[str] = set()
    for line in help_text.splitlines():
        pos = 0
        while match := _NAME.match(line, pos):
            names.add(match.group())
            separator = _SEPARATOR.match(line, match.end())
            if separator is None:
                break
            pos = separator.end()
    return names


# Verbatim lines of build 11434's help: an abbreviation, negations, a value with commas, continuations.
HELP_SAMPLE = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all sequences (default:
                                        - auto: mmap, unless a device does not support it
-dev,  --device <dev1,dev2,..>          comma-separated list of devices to use for offloading (none = don't
--control-vector-layer-range START END
"""


def test_the_help_parser_reads_every_spelling():
    assert help_options(HELP_SAMPLE) == {
        "-h", "--help", "--usage", "-t", "--threads", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
        "-dev", "--device", "--control-vector-layer-range"}


def test_every_option_of_the_pinned_llama_server_is_classified(llama_server_bin):
    result = subprocess.run([str(llama_server_bin), "--help"], capture_output=True, text=True, timeout=60)
    listed = help_options(result.stdout + result.stderr)
    assert "--temp" in listed and "--chat-template-file" in listed, "could not read the help"
    unclassified = sorted(listed - set(LLAMA_SERVER_OPTIONS.spellings()))
    assert not unclassified, (
        f"llama-server lists options core/llama_options.py does not classify: {unclassified}; add a row for each"
        " (allowed only if it tunes the model with a plain value)")
