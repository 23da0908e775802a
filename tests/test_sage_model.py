"""Model check of the sage ring's claim/confirm/commit/abandon protocol with spin.

The model is ``sage_queue/_core/model/claim.pml`` (what it checks is written at its top).
Skipped with the reason when ``spin`` (Debian package ``spin``) or a C compiler is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parent.parent / "sage_queue" / "_core" / "model" / "claim.pml"


def _tools() -> tuple[str, str]:
    spin = shutil.which("spin")
    cc = shutil.which("gcc") or shutil.which("cc")
    if not spin:
        pytest.skip("spin is not installed (apt-get install spin): the Promela model cannot be checked")
    if not cc:
        pytest.skip("no C compiler to build spin's verifier")
    return spin, cc


@pytest.mark.spec("SAGE10")
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("mode", "cflags", "pan_args"),
    [("safety", ["-DSAFETY"], ["-m100000"]), ("liveness", ["-DNP"], ["-l", "-f", "-m200000"])],
)
def test_claim_protocol_model(mode: str, cflags: list[str], pan_args: list[str], tmp_path: Path) -> None:
    spin, cc = _tools()
    model = tmp_path / MODEL.name
    model.write_text(MODEL.read_text())
    subprocess.run([spin, "-a", model.name], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    subprocess.run(
        [cc, "-O2", "-w", *cflags, "-o", "pan", "pan.c"], cwd=tmp_path, check=True, capture_output=True, timeout=120
    )
    run = subprocess.run(["./pan", *pan_args], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert "errors: 0" in run.stdout, f"{mode} check failed:\n{run.stdout}\n{run.stderr}"
    assert "Search not completed" not in run.stdout, run.stdout
    assert not (tmp_path / f"{MODEL.name}.trail").exists()
