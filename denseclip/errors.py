"""Errors a user can fix, and how the command-line scripts report them.

Bad input (a missing file, a wrong option value, a damaged checkpoint, an inconsistent dataset) raises a
`UserError` whose message says what is wrong, which file or argument, and what to do. Library callers get an
ordinary exception: each subclass is also the matching built-in type (`ConfigError` is a ValueError,
`MissingFileError` a FileNotFoundError, ...). At the command line `run_main` prints the message alone (no
traceback: tracebacks are for bugs) and exits with status 2. Under torchrun every rank exits non-zero.

Every entry point (train.py, eval.py, demo.py, tools/*.py, the pre-flight module) ends in `run_main(main)`, so all
of them speak the same way:
    error: <what, where, what to do>        exit status 2   bad input: a UserError, or argparse's own `error:`
    stopped: <what was saved, how to go on>  128 + signal    a run stopped by Ctrl-C (130) or SIGTERM (143)
    interrupted (Ctrl-C)                     130             Ctrl-C anywhere else: what was written stays
    a traceback                              1               a bug: the traceback is what a report needs
Numbers are refused where they are parsed: the argparse types `whole` and `number` below turn `--lr nan`,
`--iters 0` or `--workers -1` into argparse's `error: argument --lr: ...` (exit status 2) before anything is built.

No upstream counterpart: mmcv/mmseg report bad input as whatever exception the failing line raises.
"""
import argparse
import importlib
import math
import os
import sys


class UserError(Exception):
    """Bad input, reported by its message alone at the command line (exit status 2)."""


class ConfigError(UserError, ValueError):
    """A config field or command-line option with a value outside its allowed set."""


class DataError(UserError, ValueError):
    """Dataset files that are missing, unreadable, mis-sized or hold labels outside the classes."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by an option does not exist."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (a non-finite loss): stopped before anything bad is saved."""


class OutputError(UserError, OSError):
    """An output file that cannot be written (a full disk, a read-only folder): the previous outputs are kept."""


class MissingPackageError(UserError, ImportError):
    """An optional package (a setup.cfg extra) that the asked-for feature needs is not installed."""


class Interrupted(Exception):
    """A run stopped by a signal at a step boundary, after saving what it needs to continue: run_main prints the
    message and exits with 128 + the signal's number (SIGINT 130, SIGTERM 143: the shell's convention)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def _bounds(low, high, above) -> str:
    parts = [f"above {above}" if above is not None else f"at least {low}" if low is not None else "",
             f"at most {high}" if high is not None else ""]
    return " and ".join(p for p in parts if p)


def whole(low: int = None, high: int = None):
    """An argparse type: a whole number in [low, high] (None: unbounded on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: must be {_bounds(low, high, None)}")
        return value
    return parse


def number(low: float = None, above: float = None):
    """An argparse type: a finite number, at least `low` or strictly above `above` (NaN and infinity never)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number")
        if (low is not None and value < low) or (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"{value:g}: must be {_bounds(low, None, above)}")
        return value
    return parse


def require_package(name: str, what: str, extra: str):
    """The module `name`, imported; a MissingPackageError saying how to install it when it is not there."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingPackageError(f"{what} needs the {name} package: pip install {name} (or pip install -e "
                                  f"\".[{extra}]\" in a clone)") from None


def require_file(path, option: str, what: str = "file"):
    """MissingFileError naming the option unless `path` is an existing file."""
    if path is not None and not os.path.isfile(path):
        hint = " (it is a folder)" if os.path.isdir(path) else ""
        raise MissingFileError(f"{option} {path}: no such {what}{hint}")


PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo's words when another rank has exited


def run_main(main):
    """Call main() as the command line does (the table of the module docstring): a UserError ends the process with
    its message on stderr and exit status 2, an Interrupted run with its message and 128 + the signal, Ctrl-C
    elsewhere with one line and 130. In a distributed run, a collective that fails because another rank exited (its
    own message says why) ends this rank with status 1."""
    distributed = os.environ.get("WORLD_SIZE", "1") != "1"
    prefix = f"[rank {os.environ.get('RANK')}] " if distributed else ""
    try:
        main()
    except Interrupted as e:
        print(f"{prefix}stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print(f"{prefix}interrupted (Ctrl-C): stopped here; what was written so far stays", file=sys.stderr,
              flush=True)
        sys.exit(130)
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: its own message is the last line
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:
        if not (distributed and any(words in str(e) for words in PEER_GONE)):
            raise  # a bug: its traceback is what a report needs
        print(f"{prefix}stopped: another process of this run failed or was killed (its own output, on its machine, "
              "says why)", file=sys.stderr, flush=True)
        sys.exit(1)
