"""How every command of the project answers its user's mistakes: one line on stderr that says what
is wrong and what to do, and a non-zero exit, 2 for what is known before work starts (flags, paths,
missing data, an unwritable output folder), as argparse does, and 1 for a run that failed after it
started. A bug in the project's own code still shows its traceback; VAE_TRACEBACK=1 shows one for
every error, for reporting bugs.

No torch here: `python -m training`, `export` and `bench` share it with the server's side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

TRACEBACKS = "VAE_TRACEBACK"


class UserError(Exception):
    """A mistake of the command's user, met once work had started (exit 1); the message says what
    is wrong and what to do."""

    exit_code = 1


class UsageError(UserError):
    """A mistake that can be known before any work starts (exit 2)."""

    exit_code = 2


class Parser(argparse.ArgumentParser):
    """argparse's parser, its errors in one line (argparse prints its usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph as one line, for a command's --help (its first line alone
    can stop mid-sentence)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def run(main: Callable[[], int | None], prog: str) -> NoReturn:
    """`main()` as a command: its return value is the exit status; a UserError is one line and
    its exit code, unless VAE_TRACEBACK asks for the traceback."""
    try:
        code = main()
    except UserError as err:
        if os.environ.get(TRACEBACKS):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.exit(code or 0)


def existing_folder(path: Path, flag: str) -> Path:
    """`path`, or a UsageError naming `flag` where it is no folder. Checked after parsing, not as an
    argparse type: a parser stays a pure reading of the flags (docs and manifests are checked with it)."""
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: {'not a folder' if path.exists() else 'no such folder'}")
    return path


def writable_folder(path: Path, flag: str) -> Path:
    """`path`, made if missing, once a file could be written in it: a run learns at once, not after
    an hour of training, that its output cannot be saved."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write there ({err.strerror or err}); give a folder you can write") from None
    return path
