"""Logging for rule jobs: everything goes to the rule's log file, the console stays readable."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def job_logging(log_path: str | Path | None, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send logging, warnings and stderr (tqdm progress bars, library chatter) to `log_path`."""
    root = logging.getLogger()
    handlers: list[logging.Handler] = []
    stream = None
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(log_path, "a", buffering=1)
        handler: logging.Handler = logging.StreamHandler(stream)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    handlers.append(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    old_stderr = sys.stderr
    if stream is not None:
        sys.stderr = stream
    try:
        yield logging.getLogger("llm_energy")
    except Exception:
        logging.getLogger("llm_energy").exception("job failed")
        raise
    finally:
        sys.stderr = old_stderr
        for h in handlers:
            root.removeHandler(h)
        if stream is not None:
            stream.close()
