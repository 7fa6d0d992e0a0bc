"""Every option of mlx_lm.server (mlx-lm 0.32, `mlx_lm/server.py` `main()`), classified for `extraArgs`.

mlx_lm.server parses with argparse, so `--opt=value` and any unambiguous
prefix of a long option (`--tem` for `--temp`) are spellings too; the table
marks itself `argparse=True` and `core.extra_args` resolves them the same way.
Options the agent sets from spec fields (the KV cache, concurrency, prefill
step) are agent-owned: the memory the agent admitted depends on them.
"""

from __future__ import annotations

from metal_agent.core.extra_args import Category, OptionTable, ValueKind

NONE, INT, NUM, TEXT = ValueKind.NONE, ValueKind.INT, ValueKind.NUM, ValueKind.TEXT

SAMPLING = Category("sampling", True)
CHAT = Category("chat template", True)
SPECULATIVE = Category("speculative decoding tuning", True)

LOADS = Category("reads-file", False, "it names a model, adapter or draft directory for mlx_lm.server to load;"
                 " the agent chooses every model from the Model resource (a draft through speculativeDecoding)", security=True)
NETWORK = Category("agent-owned", False, "the agent chooses where mlx_lm.server listens and registers that endpoint")
ENDPOINT = Category("endpoint", False, "it changes which web pages may call the server (CORS), which is this Mac's"
                    " owner's setting", security=True)
LOGS = Category("agent-owned", False, "the agent reads mlx_lm.server's INFO log for load failures")
CODE = Category("code", False, "it would run Python code shipped inside a model repository", security=True)
MEMORY = Category("agent-owned", False, "it changes the memory the agent's admission reserved; use the spec field"
                  " (cacheTypeK/cacheTypeV, parallelSlots, batchSize) instead")
EXITS = Category("exits", False, "mlx_lm.server would print and exit instead of serving")

_ROWS: tuple[tuple[str, Category, ValueKind], ...] = (
    # spellings                      category      value
    ("-h --help",                    EXITS,        NONE),
    ("--model",                      LOADS,        TEXT),
    ("--adapter-path",               LOADS,        TEXT),
    ("--host",                       NETWORK,      TEXT),
    ("--port",                       NETWORK,      INT),
    ("--allowed-origins",            ENDPOINT,     TEXT),
    ("--draft-model",                LOADS,        TEXT),
    ("--num-draft-tokens",           SPECULATIVE,  INT),
    ("--trust-remote-code",          CODE,         NONE),
    ("--log-level",                  LOGS,         TEXT),
    ("--chat-template",              CHAT,         TEXT),
    ("--use-default-chat-template",  CHAT,         NONE),
    ("--temp",                       SAMPLING,     NUM),
    ("--top-p",                      SAMPLING,     NUM),
    ("--top-k",                      SAMPLING,     INT),
    ("--min-p",                      SAMPLING,     NUM),
    ("--max-tokens",                 SAMPLING,     INT),
    ("--chat-template-args",         CHAT,         TEXT),
    ("--decode-concurrency",         MEMORY,       INT),
    ("--prompt-concurrency",         MEMORY,       INT),
    ("--prefill-step-size",          MEMORY,       INT),
    ("--prompt-cache-size",          MEMORY,       INT),
    ("--prompt-cache-bytes",         MEMORY,       TEXT),
    ("--kv-bits",                    MEMORY,       INT),
    ("--kv-group-size",              MEMORY,       INT),
    ("--quantized-kv-start",         MEMORY,       INT),
    ("--pipeline",                   NETWORK,      NONE),
)

MLX_LM_OPTIONS = OptionTable.from_rows("mlx_lm.server", _ROWS, argparse=True)
