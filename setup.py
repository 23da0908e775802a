"""Builds the C11 core of the ``sage`` backend (``sage_queue._sage_core``).

Everything else is declared in pyproject.toml. A machine without a C compiler
gets a message that says so, rather than a raw compiler traceback.
"""

import os
import platform

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CORE_DIR = os.path.join("sage_queue", "_core")


class BuildExtWithHint(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CCompilerError, DistutilsExecError, PlatformError...
            raise SystemExit(
                "sage-queue: building the C core of the 'sage' backend failed "
                f"({type(exc).__name__}: {exc}).\n"
                "A C11 compiler is required: on Debian/Ubuntu 'apt-get install gcc python3-dev', "
                "on macOS 'xcode-select --install'."
            ) from exc


def core_extensions() -> list:
    sources = [os.path.join(CORE_DIR, f) for f in ("sagering.c", "_sage_core.c")]
    args = ["-std=c11", "-O2", "-Wall", "-Wextra"]
    if platform.machine() in ("x86_64", "AMD64"):
        args.append("-mcx16")  # the ring's 16-byte cursors: inline lock cmpxchg16b
    return [
        Extension(
            "sage_queue._sage_core",
            sources=sources,
            depends=[os.path.join(CORE_DIR, "sagering.h")],
            extra_compile_args=args,
        )
    ]


setup(ext_modules=core_extensions(), cmdclass={"build_ext": BuildExtWithHint})
