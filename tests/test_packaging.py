"""A non-editable install (`pip install .`) carries everything the installed package reads at run time."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sam_testing import run_python

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_non_editable_install_renders_the_model_card(tmp_path):
    """`pip install .` used to leave out model_card_template.md, so the installed push.py failed at the model card."""
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    shutil.copytree(ROOT, tmp_path / "src", ignore=shutil.ignore_patterns(
        ".git", ".ci", "tests", "benchmarks", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(tmp_path / "site"), str(tmp_path / "src")],
        check=True, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    installed = tmp_path / "site" / "sam_split"
    assert (installed / "model_card_template.md").is_file()
    assert {"push.py", "compat.py", "modeling_sam_split.py"} <= {path.name for path in installed.iterdir()}
    assert {"cli.py", "verify.py", "data.py"} <= {path.name for path in (installed / "tools").iterdir()}
    assert {"index.html", "page.js"} <= {path.name for path in (installed / "tools" / "page").iterdir()}  # --page
    # The installed copy alone (PYTHONPATH is the install, not this checkout) renders a card.
    out = run_python(
        textwrap.dedent("""
            import sam_split, sam_split.push as push
            from transformers import SamConfig
            card = push.model_card(push.parse_source("random:vit-base", None), "org/name", SamConfig())
            print(sam_split.__file__)
            print(card)
        """),
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    assert out.splitlines()[0] == str(installed / "__init__.py")
    assert "# org/name: Segment Anything with split q/k/v attention" in out and "random-weights" in out
