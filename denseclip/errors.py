"""Errors a user can fix, and how the command-line scripts report them.

Bad input (a missing file, a wrong option value, a damaged checkpoint, an inconsistent dataset) raises a
`UserError` whose message says what is wrong, which file or argument, and what to do. Library callers get an
ordinary exception: each subclass is also the matching built-in type (`ConfigError` is a ValueError,
`MissingFileError` a FileNotFoundError, ...). At the command line `run_main` prints the message alone (no
traceback: tracebacks are for bugs) and exits with status 2. Under torchrun every rank exits non-zero.

No upstream counterpart: mmcv/mmseg report bad input as whatever exception the failing line raises.
"""
import importlib
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
    """Call main(); a UserError ends the process with its message on stderr and exit status 2. In a distributed run,
    a collective that fails because another rank exited (its own message says why) ends this rank with status 1."""
    distributed = os.environ.get("WORLD_SIZE", "1") != "1"
    prefix = f"[rank {os.environ.get('RANK')}] " if distributed else ""
    try:
        main()
    except UserError as e:
        message = str(e)
        if "Original Traceback" in message:  # re-raised from a DataLoader worker: its own message is the last line
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        print(f"{prefix}error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RuntimeError as e:
        if not (distributed and any(words in str(e) for words in PEER_GONE)):
            raise  # a bug: its traceback is what a report needs
        print(f"{prefix}stopped: another process of this run failed (its message is above)", file=sys.stderr,
              flush=True)
        sys.exit(1)
