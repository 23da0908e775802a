"""Logging (issue 14): quiet by default, ``configure_logging`` and the CLI's ``--log-level``/``--log-json``."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sage_queue import QueueDescriptor, cli
from sage_queue.log import JsonLinesFormatter, configure_logging
from sage_queue.monitor import publish_job

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def restore_logger() -> Iterator[logging.Logger]:
    """The sage_queue logger as it was (handlers, level, propagate) after the test."""
    logger = logging.getLogger("sage_queue")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    for h in list(logger.handlers):
        if h not in saved[0]:
            logger.removeHandler(h)
            h.close()
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def _dead_pid() -> int:
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def _runtime_dir(tmp_path: Path) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return runtime


def test_json_lines_formatter() -> None:
    logger = logging.getLogger("sage_queue.test_log")
    record = logger.makeRecord(
        "sage_queue.test_log",
        logging.INFO,
        __file__,
        1,
        "queue %s: %d items",
        ("q1", 3),
        None,
        extra={"queue": "q1", "path": Path("/x"), "nested": {"a": [1, 2]}},
    )
    data = json.loads(JsonLinesFormatter().format(record))
    assert data["level"] == "INFO" and data["logger"] == "sage_queue.test_log" and data["msg"] == "queue q1: 3 items"
    assert data["ts"].endswith("Z") and data["ts"][10] == "T"
    assert (data["queue"], data["path"], data["nested"]) == ("q1", "/x", {"a": [1, 2]})  # Path written as str
    assert "args" not in data and "levelno" not in data  # the record's own attributes are not repeated
    try:
        raise ValueError("boom")
    except ValueError:
        record = logger.makeRecord("sage_queue.test_log", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    data = json.loads(JsonLinesFormatter().format(record))
    assert "ValueError: boom" in data["exc"] and "\n" not in JsonLinesFormatter().format(record)


def test_configure_logging_replaces_its_handler_and_checks_the_level(restore_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", json=True, stream=first)
    configure_logging("WARNING", stream=second)
    log = logging.getLogger("sage_queue.backends.something")
    log.info("not shown at WARNING")
    log.warning("shown once, as text")
    assert first.getvalue() == ""
    assert second.getvalue().count("shown once, as text") == 1
    assert "WARNING sage_queue.backends.something: shown once, as text" in second.getvalue()
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


LIBRARY_SCRIPT = """
import logging, sys
import sage_queue
from sage_queue.job import Job, JobFailed, JobManager, Stage

def numbers():
    return [1, 2, 3]

def broken(items):
    raise ValueError("the sink fails on purpose")

if sys.argv[1] == "configured":
    from sage_queue.log import configure_logging
    configure_logging("INFO", json=True)
logging.getLogger("sage_queue.backends.local").info("a backend logs at INFO")
job = Job(queues={"q": "local"}, stages=[Stage("src", numbers, output="q"), Stage("sink", broken, input="q")])
try:
    JobManager(job).run(timeout=30)
except JobFailed:
    print("failed as planned")
"""


@pytest.mark.timeout(90)
def test_the_library_is_silent_by_default_and_json_lines_when_configured(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(_runtime_dir(tmp_path))}
    script = textwrap.dedent(LIBRARY_SCRIPT)
    quiet = subprocess.run([sys.executable, "-c", script, "quiet"], capture_output=True, text=True, timeout=60, env=env)
    assert quiet.stdout.strip() == "failed as planned", quiet.stderr
    assert quiet.stderr == ""  # a failed worker is a warning of the job's logger: not shown unless asked
    loud = subprocess.run(
        [sys.executable, "-c", script, "configured"], capture_output=True, text=True, timeout=60, env=env
    )
    assert loud.stdout.strip() == "failed as planned", loud.stderr
    records = [json.loads(line) for line in loud.stderr.splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any(r["logger"] == "sage_queue.backends.local" and r["level"] == "INFO" for r in records)
    assert any(r["logger"] == "sage_queue.job" and r["level"] == "WARNING" for r in records), records


def test_cli_log_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logger: logging.Logger
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(_runtime_dir(tmp_path)))
    publish_job("stale", {"q": QueueDescriptor.create_shm_queue("log-stale")}, pid=_dead_pid())
    assert cli.main(["top", "--once"]) == 0  # removes the stale entry, at INFO: not shown
    assert capsys.readouterr().err == ""
    publish_job("stale", {"q": QueueDescriptor.create_shm_queue("log-stale")}, pid=_dead_pid())
    assert cli.main(["--log-json", "--log-level", "INFO", "top", "--once"]) == 0
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    stale = [r for r in records if "stale entry" in r["msg"]]
    assert stale and stale[0]["level"] == "INFO" and stale[0]["logger"] == "sage_queue.monitor"
    assert stale[0]["job"] == "stale"  # the fields given with extra= are there
    assert cli.main(["--log-level=nope", "ls"]) == 2
    assert "--log-level needs one of" in capsys.readouterr().err
    assert cli.main(["--log-colour", "ls"]) == 2
    assert "unknown global option" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_cli_log_json_in_a_subprocess(tmp_path: Path) -> None:
    runtime = _runtime_dir(tmp_path)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    code = (
        "from sage_queue import QueueDescriptor; from sage_queue.monitor import publish_job; "
        f"publish_job('gone', {{'q': QueueDescriptor.create_shm_queue('log-gone')}}, pid={_dead_pid()})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)
    command = [sys.executable, "-m", "sage_queue.cli", "--log-json", "--log-level", "DEBUG", "top", "--once"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]
    assert [r["job"] for r in records if "stale entry" in r["msg"]] == ["gone"]
    assert "no running sage-queue job" in out.stdout


def test_import_sage_queue_alone_makes_a_library_warning_silent() -> None:
    # A warning from any sage_queue logger before anything else ran (no JobManager started, no
    # sage_queue.log imported) must not reach stderr through logging's last-resort handler.
    code = "import logging, sage_queue; logging.getLogger('sage_queue.job').warning('should not be seen')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "should not be seen" not in done.stderr
