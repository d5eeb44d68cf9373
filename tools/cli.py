"""What every command-line tool shares: one error type, one runner (one `error:` line and an exit status, temporary
folders cleaned up on Ctrl-C and SIGTERM), progress lines, and the one resolver of "local path or Hub id"."""

import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

# `random:<size>` names a randomly initialised model of a size in the family table (`tools.family`), not a path or a
# Hub id.
RANDOM_PREFIX = "random:"


class ToolError(Exception):
    """A failure the user can act on: printed as one `error: ...` line, exit status 1, no traceback."""


def step(message: str) -> None:
    """Print a progress line with the time, at once (long steps announce themselves before they start)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the stack like any exception, so `finally` blocks and context managers (temporary folders,
    # child processes) clean up; the default SIGTERM action would end the process on the spot.
    raise SystemExit(128 + signum)


def run_tool(main: Callable[[], object]) -> int:
    """Run a tool's `main()` and return its exit status: 0, or 1 with one `error: ...` line on stderr for a `ToolError`,
    130 on Ctrl-C and 143 on SIGTERM (after cleaning up), never a traceback for those."""
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        main()
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except SystemExit as exit_request:
        if exit_request.code == 128 + signal.SIGTERM:
            print("error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# ------------------------------------------------------------------------------------------- local path or Hub id


@dataclass(frozen=True)
class Location:
    """Where a command-line argument that names a model, an adapter or a dataset points: `kind` "local" (`name` is
    the path, as given), "hub" (`name` is the repository id, `revision` a branch, tag or commit, or None) or "random"
    (a model only: `name` is `random:<size>`)."""

    kind: str
    name: str
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.kind == "hub"

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


# The longest name of one file or folder (one part of a path) that Linux, macOS and Windows file systems take, in bytes.
NAME_MAX = 255


def local_path(text: str | os.PathLike, *, flag: str) -> Path:
    """`text` as a path, `~` / `~user` expanded; a `ToolError` for an unknown user or a part of the path that no file
    system takes (over NAME_MAX bytes), where the OS would raise mid-way through a tool."""
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory": ~user of no such user
        user = str(text).split("/", 1)[0]
        raise ToolError(f"{flag} {text}: {user} names no user of this machine (no home folder to expand it to)"
                        ) from None
    check_name_lengths(path, flag=flag)
    return path


def check_name_lengths(path: str | os.PathLike, *, flag: str) -> None:
    """A `ToolError` if a part of `path` is longer than any file system takes (the OS would raise "File name too
    long" from whichever call touches it first)."""
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ToolError(f"{flag} {str(path)[:60]}...: a name in it is {len(os.fsencode(part))} bytes long; file "
                            f"systems take at most {NAME_MAX}")


def locate(text: str, revision: str | None = None, *, flag: str = "--model", random_ok: bool = False) -> Location:
    """The one resolver of "local path or Hub id" for every tool.

    With `random_ok` (a model argument), `random:<size>` is `Location("random", text)`: a randomly initialised model
    of the family table's size (`tools.models` checks the size). A path that exists is local. So is a name that
    cannot be a Hub id because it is written as a path (`./x`, `../x`, `/x`, `~/x`, `x/y/z`): then it must exist.
    Anything else must pass huggingface_hub's own repo-id validation. A `revision` is for Hub ids only, and must be a
    name the Hub accepts. Raises `ToolError` with a line saying what was expected, before anything slow starts."""
    if not text or not text.strip():
        raise ToolError(f"{flag} is empty: expected a local folder or a Hub id such as org/name")
    if random_ok and text.startswith(RANDOM_PREFIX):
        if revision is not None:
            raise ToolError(f"{flag} {text} is a randomly initialised model; a revision is for Hub ids")
        return Location("random", text)
    path = local_path(text, flag=flag)
    written_as_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if path.is_symlink() and not path.exists():  # a dangling link or a loop: local, and broken
        raise ToolError(f"{flag} {text} is a symbolic link that leads nowhere (its target is missing, or it loops); "
                        "it is taken as a local path, not a Hub id: fix or remove the link")
    if path.exists() or written_as_path:
        if not path.exists():
            raise ToolError(f"{flag} {text}: no such file or folder")
        if revision is not None:
            raise ToolError(f"{flag} {text} is a local path; a revision is for Hub ids")
        if not written_as_path:  # it could name a Hub repository too: say which one is used
            step(f"{flag} {text}: using the local {'folder' if path.is_dir() else 'file'} {path.absolute()} (a path "
                 f"that exists is taken before a Hub id; write the Hub id from another folder to use the Hub's)")
        return Location("local", text)
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ToolError(f"{flag} {text}: no such folder, and not a Hub id (expected a local path or a Hub id "
                        f"such as org/name: {str(error).splitlines()[0]})") from None
    if revision is not None:
        check_revision(revision, flag=f"{flag} revision")
    return Location("hub", text, revision)


def check_repo_id(repo_id: str, *, flag: str = "--repo-id") -> str:
    """`repo_id` if the Hub takes it as a `namespace/name` to create or write to (huggingface_hub's own validation);
    else a `ToolError` with its reason, whole."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ToolError(f"{flag} {repo_id!r} is not a valid Hub id: {' '.join(str(error).split())}") from None
    if repo_id.count("/") != 1:
        raise ToolError(f"{flag} {repo_id!r}: expected 'namespace/name' (e.g. my-org/sam-vit-base-split)")
    return repo_id


def parse_size(text: str | int, *, flag: str = "--max-shard-size") -> int | str:
    """A size as transformers' `save_pretrained(max_shard_size=...)` takes it: a number of bytes (returned as an int)
    or a number with a unit ("5GB", "20KB", "2GiB"; returned as given); a `ToolError` unless it is positive."""
    from transformers.utils.hub import convert_file_size_to_int  # here: only the tools that write weights need it

    text = str(text).strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        size = None
    if size is None or size <= 0:
        raise ToolError(f"{flag} {text!r}: expected a positive size, a number of bytes or a number with a unit such "
                        "as 5GB, 500MB, 20KB or 2GiB")
    return size if text.isdigit() else text


# What git (and so the Hub) refuses in a branch or tag name: `git check-ref-format`'s rules.
_BAD_REF = re.compile(r"(^[-/.])|(\.\.)|(//)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(\.lock$)|(\.lock/)|(/\.)|([/.]$)|(^@$)")


def check_revision(revision: str, *, flag: str = "--revision") -> str:
    """`revision` if it can name a branch, tag or commit on the Hub; else a `ToolError` saying why."""
    if not revision or len(revision) > 255 or _BAD_REF.search(revision):
        raise ToolError(f"{flag} {revision!r} is not a valid branch, tag or commit name (git's ref-name rules: no "
                        "'..', spaces, '~^:?*[\\', leading '-' or '.', trailing '/' or '.lock')")
    return revision
