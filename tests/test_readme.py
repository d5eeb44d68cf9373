"""The README's commands and code stay true."""

import re
from pathlib import Path

from sam_testing import random_stock_sam

from sam_split import SamSplitModel

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def test_two_newcomer_commands_and_ci_runs_the_test_command():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [code.strip() for lang, code in re.findall(r"```(\w+)\n(.*?)```", quick_start, flags=re.S)]
    assert len(commands) == 2
    install_and_run, test_command = commands
    assert "pip install" in install_and_run and "python push.py" in install_and_run
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_lora_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The LoRA block, on a small checkpoint saved where the first quick-start command writes its folder."""
    [example] = [code for lang, code in BLOCKS if lang == "python" and "get_peft_model(model, lora)" in code]
    SamSplitModel.from_sam(random_stock_sam()).save_pretrained(tmp_path / "sam-vit-base-split")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert "trainable params:" in capsys.readouterr().out
    assert type(scope["merged"]) is SamSplitModel and type(scope["stock"]).__name__ == "SamModel"
