"""What the installed `mlx_lm.server` accepts, and what a spec needs of it (issue 22, item 5).

The MLX engine (`core.engines.mlx_lm`) always passes `--decode-concurrency`,
`--prompt-cache-size`, `--prefill-step-size`, and for a quantized KV cache
`--kv-bits` with its companions. Older mlx-lm releases lack them, and
argparse stops the server on "unrecognized arguments": every MLX service
would crash-loop. As the llama-server dialect is read from `--help`
(`core.flags.Dialect`), this reads mlx_lm.server's, so that the command line
carries only what the installed server accepts, and a spec that needs more
is refused by field, naming the mlx-lm release that has it.

`OPTION_SINCE`: the first mlx-lm release whose `mlx_lm/server.py` has each
option, read from the PyPI wheels (0.28.0, 0.30.5, 0.30.6, 0.31.0, 0.32.0,
0.32.2): `--decode-concurrency` 0.30.6, `--prompt-cache-size` and
`--prefill-step-size` 0.31.0, `--kv-bits`, `--kv-group-size` and
`--quantized-kv-start` 0.32.0. Every release from 0.28 keeps
`ModelProvider.load(self, model_path, adapter_path=None,
draft_model_path=None)`, which `ONE_MODEL` relies on.

Pure: the adapter (`adapters.mlx_binary.probe_dialect`) reads, once at
start-up (`app.build.probe_host`), the server's source `mlx_lm/server.py`
(its `add_argument` literals are the `--help` list: the same in every wheel
above, without importing MLX), else its `--help`; this module only reads
that text. The
dialect travels in `core.launch.LaunchSettings.mlx_dialect` to `MlxLm.argv`
(`supported`) and to `claim.evaluate` (`MlxLm.server_refusals` ->
`refusals`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from metal_agent.core.api import InferenceServiceSpec
from metal_agent.core.result import FieldError

OPTION_SINCE = {
    "--decode-concurrency": "0.30.6",
    "--prompt-cache-size": "0.31.0",
    "--prefill-step-size": "0.31.0",
    "--kv-bits": "0.32.0",
    "--kv-group-size": "0.32.0",
    "--quantized-kv-start": "0.32.0",
}
#: What a spec asks of those options when it differs from what a server without them does:
#: an older server decodes one request at a time and prefills in its own steps.
DEFAULT_BATCH = 2048

_LONG_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


@dataclass(frozen=True, slots=True)
class MlxDialect:
    """The installed mlx_lm.server: its mlx-lm version and the long options its `--help` lists.
    `options` None: the help could not be read; assume a current server (pass everything)."""

    version: str = "unknown"
    options: frozenset[str] | None = None

    def has(self, option: str) -> bool:
        return self.options is None or option in self.options


def mlx_dialect_from_help(help_text: str, version: str = "unknown") -> MlxDialect:
    """From `mlx_lm.server --help`, or the text of `mlx_lm/server.py` (the same long options)."""
    found = frozenset(_LONG_OPTION.findall(help_text))
    # Help that lists not even --model is not mlx_lm.server's help: say nothing about it.
    return MlxDialect(version, found if "--model" in found else None)


def supported(argv: tuple[str, ...], dialect: MlxDialect) -> tuple[str, ...]:
    """`argv` without the agent's own versioned options (and their value) the server lacks.
    Only `OPTION_SINCE` options are dropped; `refusals` has refused any spec that needed one."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in OPTION_SINCE and not dialect.has(argv[i]):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return tuple(out)


def refusals(spec: InferenceServiceSpec, dialect: MlxDialect, key: str,
             quantized_cache: bool) -> tuple[FieldError, ...]:
    """What `spec` needs of mlx_lm.server that the installed one lacks, by field, naming the release."""
    errors: list[FieldError] = []

    def need(path: str, option: str, what: str) -> None:
        if not dialect.has(option):
            errors.append(FieldError(path, f"{what} needs mlx-lm {OPTION_SINCE[option]} or newer ({option});"
                                     f" the installed mlx-lm is {dialect.version}: upgrade it (pip install -U"
                                     " mlx-lm) or remove the field", "InferenceService", key))

    if spec.parallel_slots > 1:
        need("spec.parallelSlots", "--decode-concurrency", f"parallelSlots {spec.parallel_slots}")
    if spec.batch_size != DEFAULT_BATCH:
        need("spec.batchSize", "--prefill-step-size", f"batchSize {spec.batch_size}")
    if quantized_cache:
        path = "spec.cacheTypeCustomK" if spec.cache_type_custom_k else "spec.cacheTypeK"
        need(path, "--kv-bits", "a quantized KV cache")
    return tuple(errors)
