"""Unit tests of llm_energy.logs.job_logging: log records, stderr and failures go to the job's log file."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from llm_energy.logs import job_logging


@pytest.fixture(autouse=True)
def restore_logging_state() -> Iterator[None]:
    # job_logging sets the root level and captures warnings for the rest of the (one-job) process;
    # put both back so that other test modules see pytest's settings.
    root = logging.getLogger()
    level = root.level
    handlers = list(root.handlers)
    yield
    root.setLevel(level)
    logging.captureWarnings(False)
    assert root.handlers == handlers  # job_logging removed the handler it added


def test_log_records_and_stderr_go_to_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "measure" / "job.log"  # parent folders are created
    stderr_before = sys.stderr
    with job_logging(path) as log:
        assert log.name == "llm_energy"
        log.info("loaded %d requests", 12)
        logging.getLogger("llm_energy.backends.pytorch").warning("slow batch")
        logging.getLogger("llm_energy.noise").debug("not at INFO level")
        assert sys.stderr is not stderr_before
        print("progress bar 50%", file=sys.stderr)
        sys.stderr.write("library chatter\n")
    assert sys.stderr is stderr_before
    lines = path.read_text().splitlines()
    assert any(line.endswith("INFO llm_energy: loaded 12 requests") for line in lines)
    assert any(line.endswith("WARNING llm_energy.backends.pytorch: slow batch") for line in lines)
    assert "progress bar 50%" in lines
    assert "library chatter" in lines
    assert not any("not at INFO level" in line for line in lines)


def test_nothing_written_after_exit(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with job_logging(path):
        logging.getLogger("llm_energy").info("inside")
    logging.getLogger("llm_energy").warning("outside")
    text = path.read_text()
    assert "inside" in text and "outside" not in text


def test_debug_level(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with job_logging(path, level=logging.DEBUG):
        logging.getLogger("llm_energy.x").debug("fine detail")
    assert "DEBUG llm_energy.x: fine detail" in path.read_text()


def test_appends_to_existing_log(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    path.write_text("previous attempt\n")
    with job_logging(path):
        logging.getLogger("llm_energy").info("second attempt")
    lines = path.read_text().splitlines()
    assert lines[0] == "previous attempt"
    assert lines[-1].endswith("second attempt")


def test_exception_is_logged_and_reraised(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    stderr_before = sys.stderr
    with pytest.raises(RuntimeError, match="engine exploded"):
        with job_logging(path):
            logging.getLogger("llm_energy").info("about to fail")
            raise RuntimeError("engine exploded")
    assert sys.stderr is stderr_before
    text = path.read_text()
    assert "ERROR llm_energy: job failed" in text
    assert "Traceback (most recent call last)" in text
    assert "RuntimeError: engine exploded" in text
    assert text.index("about to fail") < text.index("job failed")


def test_warnings_go_to_file(tmp_path: Path) -> None:
    path = tmp_path / "job.log"
    with job_logging(path):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("deprecated knob", UserWarning, stacklevel=1)
    text = path.read_text()
    assert "py.warnings" in text and "UserWarning: deprecated knob" in text


def test_without_path_logs_to_stderr_and_keeps_it(capsys) -> None:
    stderr_before = sys.stderr
    with job_logging(None) as log:
        assert sys.stderr is stderr_before
        log.warning("to the console")
    assert sys.stderr is stderr_before
    assert "WARNING llm_energy: to the console" in capsys.readouterr().err
