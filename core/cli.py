"""How every command runs: a user error is one line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from core.errors import ConfigError


def _usage_error(parser, message: str) -> None:
    raise ConfigError(f"{message}; see {parser.prog} --help")


@contextlib.contextmanager
def _usage_errors_in_one_line():
    """argparse's usage errors raise ConfigError instead of printing the usage and exiting."""
    saved, argparse.ArgumentParser.error = argparse.ArgumentParser.error, _usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved


PATH_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_count(text: str) -> bool:
    """A whole number of 1 or more, in ASCII digits (str.isdigit alone takes '²')."""
    return text.isascii() and text.isdigit() and int(text) >= 1


def at_least_one(text: str) -> int:
    """argparse type of a count: a whole number, 1 or more."""
    if not is_count(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


class _DropOnBrokenPipe:
    """A text stream that goes quiet instead of raising once its reader has gone away."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (BrokenPipeError, ValueError):
            self._go_quiet()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (BrokenPipeError, ValueError):
            self._go_quiet()

    def _go_quiet(self) -> None:
        devnull = open(os.devnull, "w")
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull.fileno(), self._stream.fileno())  # the interpreter's last flush goes there too
        self._stream = devnull

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_stdout() -> None:
    """From now on, output to a stdout whose reader has gone away is dropped, not an error."""
    if not isinstance(sys.stdout, _DropOnBrokenPipe):
        sys.stdout = _DropOnBrokenPipe(sys.stdout)


def run_main(main, argv=None) -> int:
    """Run a command's main(argv). A user error prints one line `error: ...` to stderr and returns
    2, without a traceback: a ConfigError, an argparse usage error, or a FileNotFoundError (or
    another of PATH_ERRORS) that names a path. A reader of stdout that goes away
    (`... | head`) does not make the command fail: what it prints is dropped from then on."""
    survive_closed_stdout()
    try:
        with _usage_errors_in_one_line():
            return main(argv) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PATH_ERRORS as e:
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
