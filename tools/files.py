"""The one atomic writer (an output folder appears complete or not at all) and the one "new output folder" check."""

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .cli import ToolError, check_name_lengths

# The file that marks a shared build folder as this tool's own: only a folder holding it is ever removed.
BUILD_MARK = ".sam-split-build"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
MIB = 1 << 20


def check_new_folder(path: Path, *, flag: str = "--output-dir", empty: bool = True) -> None:
    """A `ToolError` unless `path` can become an output folder: absent or an empty folder, in a place this process may
    write to. Creates nothing; run it before anything slow (`atomic_output_dir` checks again at the end, since a user
    may put files there meanwhile). `empty=False`: an existing folder may hold files (a run that is resumed)."""
    check_name_lengths(path, flag=flag)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ToolError(f"{flag} {path} exists and is not a folder; choose a new folder")
    if empty and path.is_dir() and any(path.iterdir()):
        raise ToolError(f"{flag} {path} exists and is not empty; choose a new folder")
    existing = next(folder for folder in (path.absolute(), *path.absolute().parents) if folder.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ToolError(f"{flag} {path} is not writable: cannot create a file in {existing} "
                        f"({error.strerror or error})") from None


def _listing(target: Path) -> dict[str, tuple[int, int]] | None:
    """{relative path: (size, mtime in ns)} of everything under `target`; None when it does not exist."""
    if not target.is_dir():
        return None
    return {path.relative_to(target).as_posix(): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in target.rglob("*")}


@contextlib.contextmanager
def atomic_output_dir(target: Path | None, *, existing: str = "refuse", last: str | None = None,
                      prefix: str = ".sam-split-build-", flag: str = "--output-dir",
                      shared: Callable[[], object] | None = None, main_process: bool = True) -> Iterator[Path]:
    """Yield an empty folder to write into; when the `with` block succeeds, its content becomes `target` at once.

    The folder is made beside `target` (same file system, so the move is a rename) and removed on every other way
    out: an exception, Ctrl-C, SIGTERM under `run_tool`. A full disk in the block is a `ToolError` (one line). With
    `target=None` it is a scratch folder in the system's temporary directory, always removed. `existing` says what to
    do when `target` already holds something:
      - "refuse": raise `ToolError` (before anything is written); an empty folder counts as absent;
      - "replace": swap the whole folder for the new one;
      - "update": move the new files into it one by one, replacing files of the same names and keeping the others
        (e.g. checkpoints beside an adapter); `last` names the file removed first and moved in last, so that a reader
        never finds it beside a mix of old and new files (e.g. `adapter_config.json`).
    Nothing the tool did not write is removed: if `target` changed while the block ran (a user put a file into it),
    "refuse" and "replace" raise `ToolError` at the end, keep the complete build and name it.

    `shared`: the processes of one distributed run (accelerate/DDP) write into ONE build folder, `shared` being their
    barrier (e.g. `accelerator.wait_for_everyone`) and `main_process` saying which one prepares and moves it. Each
    process would pick its own random name, and they cannot agree on one without exchanging it, so the shared build
    folder has a name that every process computes alike: `<target>.partial`. A fixed name can already be taken, by a
    user or by a run of ours that was killed: the main process marks the folder it makes with BUILD_MARK and removes
    a leftover only if it carries that mark, so it never removes a folder it did not create.
    """
    if existing not in ("refuse", "replace", "update"):
        raise ValueError(f"existing={existing!r}: expected 'refuse', 'replace' or 'update'")
    if target is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
            yield Path(scratch)
        return
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise ToolError(f"{flag} {target} exists and is not a folder")
    if existing == "refuse":
        check_new_folder(target, flag=flag)
    before = _listing(target)
    build = _make_build(target, prefix, shared, main_process)
    try:
        try:
            yield build
        except Exception as error:
            if _disk_full(error, build):
                reason = (f"{error.strerror} ({error.filename or 'a file'})" if isinstance(error, OSError)
                          else f"no space left on the device ({type(error).__name__}: {str(error)[:200]})")
                raise ToolError(f"writing {target} failed: {reason}; nothing was left half-written") from error
            raise
        if shared is not None:
            shared()  # every process has written its part
        if main_process:
            _move_into_place(build, target, existing, last, before, flag)
        if shared is not None:
            shared()  # no process goes on before the folder is in place
    finally:  # (a build kept for the user after a refused move is no longer at `build`)
        if main_process and build.exists():
            shutil.rmtree(build, ignore_errors=True)


def _disk_full(error: Exception, folder: Path) -> bool:
    """Whether `error`, raised while writing into `folder`, is a full disk. Writers do not all say so: Python's own
    I/O raises OSError(ENOSPC), safetensors a SafetensorError naming "os error 28", torch.save a RuntimeError
    ("unexpected pos ..."); so besides the error number, a failed write on a file system with less than 1 MiB left
    for this user counts as one."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in DISK_FULL
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < MIB


def _make_build(target: Path, prefix: str, shared, main_process: bool) -> Path:
    """The empty build folder beside `target`: a fresh random name, or for `shared` the fixed `<target>.partial`."""
    try:
        if shared is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        build = target.with_name(target.name + ".partial")
        if main_process:
            target.parent.mkdir(parents=True, exist_ok=True)
            if build.exists() or build.is_symlink():
                if not (build.is_dir() and not build.is_symlink() and (build / BUILD_MARK).is_file()):
                    raise ToolError(f"{build} exists and was not made by this tool; move it away or choose another "
                                    "output folder (nothing was removed)")
                owner = _running_owner(build / BUILD_MARK)
                if owner is not None:
                    raise ToolError(f"{build} is being written by another run (process {owner}); wait for it or "
                                    "choose another output folder (nothing was removed)")
                shutil.rmtree(build)  # a leftover of a killed run of ours: it carries our mark
            build.mkdir()
            (build / BUILD_MARK).write_text(f"{os.getpid()} {socket.gethostname()}\n"
                                            "made by sam-split as a build folder; removed when the build ends\n")
        shared()  # the folder exists before any process writes into it
        return build
    except OSError as error:
        raise ToolError(f"cannot write beside {target}: {error.strerror or error}") from error


def _running_owner(mark: Path) -> int | None:
    """The id of the live process on this machine that made the build folder of `mark`, or None (it ended)."""
    try:
        pid, host = mark.read_text().split()[:2]
        os.kill(int(pid), 0)
    except PermissionError:  # alive, another user's
        pass
    except (ValueError, OSError):  # an unreadable mark, or no such process (ProcessLookupError)
        return None
    return int(pid) if host == socket.gethostname() and int(pid) != os.getpid() else None


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it (a moment, at the end of a build)
    os.umask(mask)
    return mask


def _ordinary_modes(build: Path) -> None:
    """Give the build what an ordinary `mkdir` / `open` under the user's umask would (0755 folders, 0644 files at
    umask 022): `mkdtemp` makes the folder 0700, and safetensors writes `model.safetensors` 0600 (through
    `save_pretrained` too), which would leave the published folder unreadable to other users beside 0644 files."""
    mask = _umask()
    for path in [build, *build.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~mask)


def _move_into_place(build: Path, target: Path, existing: str, last: str | None, before, flag: str) -> None:
    (build / BUILD_MARK).unlink(missing_ok=True)
    _ordinary_modes(build)
    if existing == "update" and target.is_dir():
        names = sorted(path.name for path in build.iterdir())
        if last in names:
            (target / last).unlink(missing_ok=True)
            names.remove(last)
            names.append(last)
        for name in names:
            if (target / name).is_dir() and not (target / name).is_symlink():
                shutil.rmtree(target / name)
            os.replace(build / name, target / name)
        return
    now = _listing(target)
    if now != before and now:  # someone wrote into the target meanwhile: theirs stays, ours is kept beside it
        kept = Path(tempfile.mkdtemp(prefix=f"{target.name}.new-", dir=target.parent))
        kept.rmdir()
        os.replace(build, kept)
        changed = sorted(name for name in now if (before or {}).get(name) != now[name])
        raise ToolError(f"{flag} {target} changed while the tool ran ({', '.join(changed[:3])}"
                        f"{' ...' if len(changed) > 3 else ''}); nothing in it was touched. The complete result is "
                        f"in {kept}")
    old = None
    if target.exists():
        if any(target.iterdir()):  # "replace": keep the old folder until the new one is in place
            old = target.with_name(f"{build.name}-old")
            os.replace(target, old)
        else:
            target.rmdir()
    os.replace(build, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
