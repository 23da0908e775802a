"""The suite's own leak guards (tests/conftest.py) must be able to fail.

Each test runs a small inner pytest session, in a subprocess, with this suite's
conftest, whose one test leaks on purpose; the inner run must fail and name the leak.
"""

from __future__ import annotations

import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def _inner(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    pytester.makepyfile(test_inner=body)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=90)


@pytest.mark.spec("Q26")
@pytest.mark.timeout(120)
def test_a_leaked_segment_fails_the_run(pytester: pytest.Pytester) -> None:
    name = f"leakguard-{uuid.uuid4().hex[:10]}"
    result = _inner(
        pytester,
        f"""
from sage_queue import QueueDescriptor, resolve_descriptor

def test_leaks_a_segment():
    q = resolve_descriptor(QueueDescriptor.create_shm_queue({name!r}))
    q.close()  # closed, never destroyed
""",
    )
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        result.stdout.fnmatch_lines(["*shared-memory leak*", f"*sageq-shm-{name}*"])
    finally:
        from sage_queue._segment import unlink

        unlink("shm", name)


@pytest.mark.spec("Q26")
@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="the process guard reads /proc (Linux)")
def test_a_leaked_process_fails_the_run(pytester: pytest.Pytester) -> None:
    pid_file = pytester.path / "leaked.pid"
    result = _inner(
        pytester,
        f"""
import subprocess, sys

def test_leaks_a_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open({str(pid_file)!r}, "w").write(str(child.pid))
""",
    )
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        pid = int(pid_file.read_text())
        result.stdout.fnmatch_lines(["*process leak*", f"*{pid} *time.sleep(120)*"])
    finally:
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.timeout(120)
def test_a_leaked_temporary_directory_fails_the_run(pytester: pytest.Pytester) -> None:
    path_file = pytester.path / "leaked.path"
    result = _inner(
        pytester,
        f"""
import tempfile

def test_leaks_a_temporary_directory():
    open({str(path_file)!r}, "w").write(tempfile.mkdtemp(prefix="sageq-leakguard-"))
""",
    )
    try:
        assert result.ret == pytest.ExitCode.TESTS_FAILED
        leaked = Path(path_file.read_text())
        result.stdout.fnmatch_lines(["*temporary file leak*", f"*{leaked.name}*"])
    finally:
        if path_file.exists():
            shutil.rmtree(path_file.read_text(), ignore_errors=True)
