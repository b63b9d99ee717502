"""Capturing a nanochat logger's messages in tests."""
from __future__ import annotations

import contextlib
import logging


class LogMessages(logging.Handler):
    """Collects the messages of one `nanochat.*` logger. The CLI replaces the handlers of
    `nanochat` and stops its propagation to the root, so pytest's caplog sees nothing."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@contextlib.contextmanager
def capture_log(name: str):
    """Attach a LogMessages handler to logger `name` at INFO for the duration."""
    logger = logging.getLogger(name)
    handler, level = LogMessages(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
