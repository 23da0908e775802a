"""A descriptor's ``key_file`` comes from whoever wrote the descriptor: it may name anything.

Found by attacking: a key_file naming a FIFO made resolve block for ever in ``open()`` (a FIFO's
open waits for a writer). Every such path must be refused at once with QueuePermissionError (RPC4).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

RESOLVE = r"""
import sys
from sage_queue import QueueDescriptor, QueuePermissionError, resolve_descriptor
desc = QueueDescriptor.create("rpc", "k", host="127.0.0.1", port=9, key_file=sys.argv[1], connect_timeout=1.0)
try:
    resolve_descriptor(desc)
except QueuePermissionError as exc:
    print("QueuePermissionError", exc)
"""


@pytest.mark.spec("RPC4")
@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["fifo", "directory", "char-device"])
def test_a_key_file_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    if kind == "fifo":
        path = tmp_path / "key.fifo"
        os.mkfifo(path, 0o600)
    elif kind == "directory":
        path = tmp_path / "key.dir"
        path.mkdir(mode=0o700)
    else:
        path = Path("/dev/null")
    # In a child: the old code never returned from open() on the FIFO.
    done = subprocess.run([sys.executable, "-c", RESOLVE, str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("QueuePermissionError"), done.stdout + done.stderr[-2000:]
    assert str(path) in done.stdout
