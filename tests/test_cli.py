"""``sage-queue``: the command front (usage, unknown commands, lazy subcommands, exit codes)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sage_queue import MetadataField, cli, register_queue_implementation, unregister_queue_implementation

SCRIPT = Path(sys.executable).with_name("sage-queue")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "sage_queue.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_installed_script_prints_usage() -> None:
    out = _run("--help")
    assert out.returncode == 0, out.stderr
    for name in cli.SUBCOMMANDS:
        assert name in out.stdout
    bare = _run()
    assert bare.returncode == 2
    assert "usage: sage-queue [--log-level LEVEL] [--log-json] COMMAND" in bare.stdout


@pytest.mark.timeout(60)
def test_unknown_command() -> None:
    out = _run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr


@pytest.mark.timeout(60)
def test_demo_subcommand_is_wired() -> None:
    out = _run("demo", "--help")
    assert out.returncode == 0, out.stderr
    assert "--backends" in out.stdout and "--wait" in out.stdout


def test_subcommand_that_is_not_installed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "missing", ("sage_queue_no_such_module:main", "not here"))
    assert cli.main(["missing"]) == 2
    assert "not available in this installation" in capsys.readouterr().err


def test_subcommand_exit_status_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    planned = f"planned_{uuid.uuid4().hex[:8]}"  # known by name and schema only: the demo skips it
    register_queue_implementation(planned, None, metadata=[MetadataField("host", str)])
    try:
        assert cli.main(["demo", "--backends", planned]) == 0  # only a skipped row: nothing failed
    finally:
        unregister_queue_implementation(planned)
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--no-such-option"])
    assert info.value.code == 2


@pytest.mark.timeout(60)
def test_cli_import_is_light() -> None:
    script = (
        "import sys, sage_queue.cli; "
        "print(sorted(m for m in ('ray', 'zmq', 'numpy', 'sage_queue.demo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


@pytest.mark.spec("D13")
@pytest.mark.timeout(60)
def test_inspect_prints_a_descriptor_of_every_builtin_type_with_no_transport_installed() -> None:
    # Issue 8 §1: `sage-queue inspect` must parse, validate and print every known type's descriptor
    # where Ray, pyzmq and the C core are missing (before: BackendUnavailable for ray_queue/rpc).
    import json
    import textwrap

    samples = {
        "local": {"owner_pid": 1},
        "shm": {"shm_name": "inspect-nowhere-shm"},
        "sage": {"shm_name": "inspect-nowhere-sage"},
        "ray_queue": {"actor_name": "a"},
        "ray_actor": {"actor_name": "a", "namespace": "ns"},
        "rpc": {"host": "h", "port": 5555, "name": "n"},
    }
    script = textwrap.dedent(
        """
        import sys
        for name in ("ray", "zmq", "sage_queue._sage_core"):
            sys.modules[name] = None
        from sage_queue.cli import main
        sys.exit(main(["inspect", sys.argv[1]]))
        """
    )
    for queue_type, metadata in samples.items():
        text = json.dumps({"queue_id": "q", "queue_type": queue_type, "metadata": metadata})
        out = subprocess.run([sys.executable, "-c", script, text], capture_output=True, text=True, timeout=30)
        # A segment type's segment does not exist here: exit 1 with a note, never a traceback.
        assert out.returncode == (1 if queue_type in ("shm", "sage") else 0), (queue_type, out.stderr)
        assert out.stderr == "", out.stderr
        shown = json.loads(out.stdout)["descriptor"]
        assert shown["queue_type"] == queue_type
        assert shown["metadata"].items() >= metadata.items()  # defaults filled in, nothing lost
