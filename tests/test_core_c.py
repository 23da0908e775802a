"""The C core's own tests (sage_queue/_core/tests/*.c), built with AddressSanitizer and UBSan.

Compiled into a temporary directory with the system C compiler and run as a child
process; skipped (with the reason) only when no C compiler is installed.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "sage_queue" / "_core"
C_TESTS = sorted((CORE / "tests").glob("test_*.c"))
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
SOAK = os.environ.get("SAGE_SOAK") == "1"
RUN_TIMEOUT_S = 1200 if SOAK else 200
"""The random-corruption test runs 50 times more rounds under SAGE_SOAK=1 (make soak)."""


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler (gcc/cc/clang) on PATH: the C core's sanitizer tests cannot be built")
    return cc


@pytest.mark.timeout(RUN_TIMEOUT_S + 140)
@pytest.mark.spec("SAGE9", "SAGE10", "SAGE11", "SAGE12", "SAGE15")
@pytest.mark.parametrize("source", C_TESTS, ids=[p.stem for p in C_TESTS])
def test_c_core_under_asan_and_ubsan(source: Path, tmp_path: Path) -> None:
    cc = _compiler()
    exe = tmp_path / source.stem
    cmd = [cc, "-std=c11", "-g", "-O1", "-Wall", "-Wextra", "-Werror", *SANITIZE, f"-I{CORE}"]
    if platform.machine() in ("x86_64", "AMD64"):
        cmd.append("-mcx16")
    cmd += [str(source), "-o", str(exe), "-lpthread"]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{build.stderr}"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert run.returncode == 0, f"C tests failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert "all sagering C tests passed" in run.stdout
