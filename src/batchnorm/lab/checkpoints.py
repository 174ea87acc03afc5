"""The lab's files of tensors (checkpoints, kept runs): written atomically, read as data.

Reading never runs code from the file: ``torch.load(weights_only=True)`` takes tensors
and plain Python values only, which is all the lab writes; a file holding anything else
(a pickled object whose ``__reduce__`` would call ``os.system``) is refused. Every way a
file can be unreadable (empty, truncated, not torch's format, another layout) raises
CheckpointError, one line that names the file.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import tempfile

import torch

__all__ = ["CheckpointError", "load", "save_atomically"]

_ZIP = b"PK\x03\x04"  # torch.save's format is a zip archive
_PARTIAL = re.compile(r"^\.partial-.*\.(\d+)\.tmp$")


class CheckpointError(ValueError):
    """A checkpoint or kept run that cannot be used; the message names the file."""


def save_atomically(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, fsync'd, renamed over ``path``, and
    the directory fsync'd: a reader sees the old file or the new one, and after a crash
    the rename is on disk or not made. Temporaries left by writers that were killed (no
    such process any more) are removed first."""
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_partials(directory)
    handle, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".partial-{os.path.basename(path)}-", suffix=f".{os.getpid()}.tmp"
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _remove_stale_partials(directory: str) -> None:
    for name in glob.glob(".partial-*.tmp", root_dir=directory):
        match = _PARTIAL.match(name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one file at a time: a partial of its own is left over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: str, keys: dict[str, type | tuple[type, ...]], what: str = "checkpoint") -> dict:
    """The dict saved at ``path``, checked to hold ``keys`` with values of those types."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(len(_ZIP))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the {what}: {error.strerror}") from None
    if head != _ZIP:
        found = "empty" if not head else "not a file written by torch.save"
        raise CheckpointError(f"{path}: not a {what}: the file is {found}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = next(
            (line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line),
            "it holds objects other than tensors and plain values",
        )
        raise CheckpointError(
            f"{path}: refused: the {what} holds something other than tensors and plain values, "
            f"which this lab never writes ({reason})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable {what} (truncated or damaged): {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a {what} of this lab: it holds a {type(state).__name__}, not a dict")
    for key, kind in keys.items():
        if key not in state:
            raise CheckpointError(f"{path}: not a {what} of this lab: no {key!r} in it")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(
                f"{path}: not a {what} of this lab: {key!r} is a {type(state[key]).__name__}, expected {names}"
            )
    return state
