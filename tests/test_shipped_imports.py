"""Each twin's published code imports only torch and transformers: transformers' own `get_imports` (what
`trust_remote_code` checks before it runs a repo's code) finds no package but those two and the standard library in
any file push.py ships."""

import sys

import pytest
from transformers.dynamic_module_utils import get_imports

from sam_split import push
from sam_split.tools.family import MEMBERS

ALLOWED = {"torch", "transformers"}


@pytest.mark.parametrize("member", [member for member in MEMBERS if member.twin is not None],
                         ids=lambda member: member.name)
def test_shipped_model_files_import_only_torch_and_transformers(member):
    files = push.code_files(member.twin)
    assert f"modeling_{member.twin.config_class.model_type}.py" in files
    for name in files:
        imports = set(get_imports(push.HERE / name)) - set(sys.stdlib_module_names)
        assert imports <= ALLOWED, f"{name} imports {sorted(imports - ALLOWED)}"


def test_get_imports_would_catch_a_third_package(tmp_path):
    """The check above can fail: a shipped file with an optional package's import is reported."""
    source = (push.HERE / "modeling_sam_split.py").read_text()
    (tmp_path / "modeling_x.py").write_text("import numpy as np\n" + source)
    assert set(get_imports(tmp_path / "modeling_x.py")) - set(sys.stdlib_module_names) - ALLOWED == {"numpy"}
