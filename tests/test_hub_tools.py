"""hub_tools: the atomic output folder the tools write through, and the Hub helpers' errors."""

from pathlib import Path

import pytest

from sam_split.hub_tools import ToolError, atomic_output_dir


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
    with pytest.raises(ToolError, match="cannot write beside /proc/sam-split-out"):  # root may not write there either
        with atomic_output_dir(Path("/proc/sam-split-out")):
            pass


def test_scratch_folder_without_target_is_always_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    with atomic_output_dir(None) as build:
        (build / "x").write_text("x")
        assert build.parent == tmp_path
    assert not list(tmp_path.iterdir())
