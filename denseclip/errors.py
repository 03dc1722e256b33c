"""Errors a user can fix, and how the command-line scripts report them.

Bad input (a missing file, a wrong option value, a damaged checkpoint, an inconsistent dataset) raises a
`UserError` whose message says what is wrong, which file or argument, and what to do. Library callers get an
ordinary exception: each subclass is also the matching built-in type (`ConfigError` is a ValueError,
`MissingFileError` a FileNotFoundError, ...). At the command line `run_main` prints the message alone (no
traceback: tracebacks are for bugs) and exits with status 2. Under torchrun every rank exits non-zero.

No upstream counterpart: mmcv/mmseg report bad input as whatever exception the failing line raises.
"""
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


def require_file(path, option: str, what: str = "file"):
    """MissingFileError naming the option unless `path` is an existing file."""
    if path is not None and not os.path.isfile(path):
        hint = " (it is a folder)" if os.path.isdir(path) else ""
        raise MissingFileError(f"{option} {path}: no such {what}{hint}")


def run_main(main):
    """Call main(); a UserError ends the process with its message on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
