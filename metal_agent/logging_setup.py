"""structlog configuration: JSON for launchd's log files, readable text on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


class _SafePrintLogger(structlog.PrintLogger):
    """Prints like structlog's, but a log line that cannot be written (agent.log on a full
    disk, a closed stderr) is dropped, never raised: logging must not be what stops the
    agent from starting, or a supervisor from restarting a model."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except (OSError, ValueError):  # ENOSPC, EIO, EPIPE; ValueError: the file is closed
            pass

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg


class _SafePrintLoggerFactory:
    def __init__(self, file) -> None:
        self._file = file

    def __call__(self, *args) -> _SafePrintLogger:
        return _SafePrintLogger(self._file)


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_SafePrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
