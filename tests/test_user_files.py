"""No tool removes a file it did not create: a file a user puts into `finetune.py --merge-to-sam DIR` or into
`evaluate.py --output-dir OUT` while the tool runs is still there afterwards (both go through the one atomic
writer, `tools.files.atomic_output_dir`), and the run says so in one line instead of exiting 0."""

import pytest
from accelerate.state import AcceleratorState
from test_finetune import FAST, trainable_random_sam, write_shapes

from sam_split import evaluate, finetune
from sam_split.tools.cli import ToolError

pytestmark = pytest.mark.slow  # a training step or a scoring run each (~30-50 s on 2 shared cores)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-files")
    trainable_random_sam().save_pretrained(root / "base")
    return {"base": root / "base", "train": write_shapes(root / "train", 4, seed=0),
            "val": write_shapes(root / "val", 2, seed=1)}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_file_put_into_merge_to_sam_during_training_is_kept(data, tmp_path, monkeypatch):
    merged = tmp_path / "merged"
    real_train = finetune.train

    def user_writes_meanwhile(*args, **kwargs):
        merged.mkdir()
        (merged / "notes.txt").write_text("mine")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(finetune, "train", user_writes_meanwhile)
    with pytest.raises(ToolError, match=rf"(?s)--merge-to-sam {merged} exists and is not empty.* --publish-only "
                                        "--merge-to-sam NEW_DIR"):
        finetune.main(["--model", str(data["base"]), "--train-data", str(data["train"]), "--output-dir",
                       str(tmp_path / "out"), "--max-steps", "1", "--merge-to-sam", str(merged), *FAST])
    assert [path.name for path in merged.iterdir()] == ["notes.txt"] and (merged / "notes.txt").read_text() == "mine"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # the trained adapter is complete


def test_a_file_put_into_evaluate_output_dir_while_it_scores_is_kept(data, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    real_evaluate = evaluate.evaluate

    def user_writes_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", user_writes_meanwhile)
    with pytest.raises(ToolError, match=rf"--output-dir {out} changed while the tool ran \(notes.txt\).* The "
                                        "complete result is in"):
        evaluate.main(["--model", str(data["base"]), "--data", str(data["val"]), "--output-dir", str(out),
                       "--num-workers", "0", "--overlay-images", "0"])
    assert [path.name for path in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    kept = next(tmp_path.glob("eval.new-*"))
    assert (kept / "metrics.json").is_file()
