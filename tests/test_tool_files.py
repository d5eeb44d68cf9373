"""tools.files and tools.hub: the atomic output folder the tools write through, and the Hub helpers' errors."""

from pathlib import Path

import pytest

from sam_split.tools.cli import ToolError
from sam_split.tools.files import atomic_output_dir


def leftovers(parent):
    return sorted(path.name for path in parent.iterdir() if path.name.startswith(".sam-split-build-"))


def test_the_build_appears_at_once_and_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as build:
        (build / "a.txt").write_text("new")
        assert not target.exists() and build.parent == tmp_path  # beside the target: the move is a rename
    assert (target / "a.txt").read_text() == "new" and not leftovers(tmp_path)
    (tmp_path / "empty").mkdir()
    with atomic_output_dir(tmp_path / "empty") as build:  # an empty folder counts as absent
        (build / "b.txt").write_text("b")
    assert (tmp_path / "empty" / "b.txt").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_folder_and_its_files_get_the_modes_of_the_umask(tmp_path, umask):
    """As `mkdir` and `open` under the umask would make them: not mkdtemp's 0700 folder, not the 0600 that safetensors
    gives `model.safetensors` (through `save_pretrained` too)."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as build:
            save_file({"w": torch.zeros(2)}, str(build / "model.safetensors"))
            (build / "sub").mkdir(mode=0o700)
            (build / "sub" / "private.txt").touch(mode=0o600)
            (build / "run.sh").touch(mode=0o700)
    finally:
        os.umask(previous)
    modes = {path.relative_to(tmp_path).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in [tmp_path / "out", *(tmp_path / "out").rglob("*")]}
    assert modes == {"out": 0o777 & ~umask, "out/sub": 0o777 & ~umask, "out/model.safetensors": 0o666 & ~umask,
                     "out/sub/private.txt": 0o666 & ~umask, "out/run.sh": 0o777 & ~umask}


@pytest.mark.parametrize("failure", [ValueError("boom"), KeyboardInterrupt(), SystemExit(143)])
def test_every_failure_leaves_nothing(tmp_path, failure):
    with pytest.raises(type(failure)):
        with atomic_output_dir(tmp_path / "out") as build:
            (build / "half.txt").write_text("half")
            raise failure
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_existing_target_is_refused_replaced_or_updated(tmp_path):
    target = tmp_path / "out"
    (target / "checkpoints").mkdir(parents=True)
    (target / "adapter_config.json").write_text("old")
    (target / "old.txt").write_text("old")
    with pytest.raises(ToolError, match="exists and is not empty"):
        with atomic_output_dir(target):
            pytest.fail("a refused target must fail before the build starts")
    with atomic_output_dir(target, existing="update", last="adapter_config.json") as build:
        (build / "adapter_config.json").write_text("new")
        (build / "weights").write_text("new")
    assert {path.name for path in target.iterdir()} == {"checkpoints", "adapter_config.json", "old.txt", "weights"}
    assert (target / "adapter_config.json").read_text() == "new"
    with atomic_output_dir(target, existing="replace") as build:
        (build / "only.txt").write_text("only")
    assert [path.name for path in target.iterdir()] == ["only.txt"] and not leftovers(tmp_path)


def test_unwritable_places_are_clear_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ToolError, match="exists and is not a folder"):
        with atomic_output_dir(tmp_path / "file"):
            pass
    # /proc: root may not write there either. A new folder is checked before the block runs; a folder to replace
    # fails where the build folder is made.
    with pytest.raises(ToolError, match="--output-dir /proc/sam-split-out is not writable: cannot create a file in "
                                        "/proc "):
        with atomic_output_dir(Path("/proc/sam-split-out")):
            pass
    with pytest.raises(ToolError, match="cannot write beside /proc/sam-split-out"):
        with atomic_output_dir(Path("/proc/sam-split-out"), existing="replace"):
            pass


def test_scratch_folder_without_target_is_always_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with atomic_output_dir(None) as build:
        (build / "x").write_text("x")
        assert build.parent == tmp_path
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("existing", ["refuse", "replace"])
def test_a_file_the_user_put_into_the_target_meanwhile_is_kept(tmp_path, existing):
    target = tmp_path / "out"
    if existing == "replace":
        target.mkdir()
        (target / "previous.txt").write_text("previous result")
    with pytest.raises(ToolError, match=r"changed while the tool ran \(mine.txt\).* complete result is in "):
        with atomic_output_dir(target, existing=existing) as build:
            (build / "result.txt").write_text("result")
            target.mkdir(exist_ok=True)
            (target / "mine.txt").write_text("the user's")
    assert (target / "mine.txt").read_text() == "the user's"
    assert (target / "previous.txt").exists() == (existing == "replace")
    kept = [path for path in tmp_path.iterdir() if path.name.startswith("out.new-")]
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "result" and not leftovers(tmp_path)


def test_shared_build_folder_is_removed_only_when_it_is_ours(tmp_path):
    target, calls = tmp_path / "out", []
    barrier = lambda: calls.append("barrier")  # noqa: E731 - one process: the barrier only counts
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "user.txt").write_text("not the tool's")
    with pytest.raises(ToolError, match="out.partial exists and was not made by this tool"):
        with atomic_output_dir(target, shared=barrier):
            pytest.fail("refused before the block")
    assert (tmp_path / "out.partial" / "user.txt").read_text() == "not the tool's"
    import os
    import socket

    (tmp_path / "out.partial" / ".sam-split-build").write_text(f"{os.getppid()} {socket.gethostname()}\n")
    with pytest.raises(ToolError, match=f"out.partial is being written by another run \\(process {os.getppid()}\\)"):
        with atomic_output_dir(target, shared=barrier):  # e.g. a second evaluate.py into the same --output-dir
            pytest.fail("refused before the block")
    assert (tmp_path / "out.partial" / "user.txt").exists()
    (tmp_path / "out.partial" / "user.txt").unlink()
    (tmp_path / "out.partial" / ".sam-split-build").write_text("left by a killed run of ours")
    (tmp_path / "out.partial" / "stale.txt").write_text("stale")
    with atomic_output_dir(target, shared=barrier) as build:
        assert build == tmp_path / "out.partial" and sorted(path.name for path in build.iterdir()) == [
            ".sam-split-build"]
        (build / "a.txt").write_text("a")
    assert sorted(path.name for path in target.iterdir()) == ["a.txt"] and not (tmp_path / "out.partial").exists()
    assert calls == ["barrier"] * 3
    with pytest.raises(ValueError):
        with atomic_output_dir(tmp_path / "other", shared=barrier) as build:
            raise ValueError("a failure in the block")
    assert not (tmp_path / "other.partial").exists() and not (tmp_path / "other").exists()


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    real_write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "weights.bin":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ToolError, match=r"No space left on device .*weights.bin\); nothing was left half-written"):
        with atomic_output_dir(tmp_path / "out") as build:
            (build / "config.json").write_text("{}")
            (build / "weights.bin").write_text("x" * 100)
    assert list(tmp_path.iterdir()) == []
