"""Every data format end to end: finetune.py trains a tiny SAM for 2 steps on generated data in that format that holds
a broken file (named with its reason in the log, the rest trained), validates with the format's class names, then
evaluate.py scores the adapter per class and writes masks and overlays; with --strict-data the same data is refused
with a clear message naming the broken file. The Hub dataset id runs in a child process against the local test Hub,
pinned to its first revision."""

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from accelerate.state import AcceleratorState
from PIL import Image
from sam_testing import hub_env
from test_data import label_folder, noise, rect, shapes_dataset, skipped, two_cats_and_two_dogs, write_coco
from test_finetune import FAST, metrics, trainable_random_sam
from test_segmentation import write_objects

from sam_split import evaluate, finetune
from sam_split.tools.cli import run_tool

TESTS = Path(__file__).resolve().parent
DATASET_ARGS = ["--image-column", "picture", "--mask-column", "masks", "--class-column", "kind"]


@dataclass(frozen=True)
class Format:
    classes: set  # class names the format gives its objects
    broken: str  # the name the log gives the broken sample ...
    reason: str  # ... and the start of its reason
    sizes: dict  # (width, height) of each usable image, by name without suffix
    objects: int  # usable objects

    @property
    def images(self) -> int:
        return len(self.sizes)


def write_folder(root: Path) -> tuple:
    """images/ + masks/: 3 images of 3, 1 and 2 objects, and an image file that is no PNG (with a good mask)."""
    data = write_objects(root / "data", {"a": 3, "b": 1, "c": 2})
    (data / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(rect(64, 64, 10, 10, 40, 40).astype(np.uint8) * 255).save(data / "masks" / "broken_0.png")
    return str(data), []


def write_label_maps(root: Path) -> tuple:
    """images/ + labels/ + classes.txt (cat, dog), class mode with void 255: 2 maps of 4 objects each, and a
    truncated label map."""
    labels = two_cats_and_two_dogs()
    data = label_folder(root / "data", {"scene": labels, "mirrored": labels[:, ::-1].copy()})
    noise(32, 40).save(data / "images" / "truncated.png")
    (data / "labels" / "truncated.png").write_bytes(b"\x89PNG truncated")
    return str(data), ["--ignore-index", "255"]


def write_coco_json(root: Path) -> tuple:
    """test_data's COCO file (polygons, compressed and uncompressed RLE, crowd, bad annotations) with images under
    --image-root, plus an annotated image whose file is no PNG."""
    path = write_coco(root / "data")
    coco = json.loads(path.read_text())
    coco["images"].append({"id": 8, "file_name": "broken.png", "width": 16, "height": 16})
    coco["annotations"].append({"id": 80, "image_id": 8, "category_id": 3, "iscrowd": 0,
                                "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]})
    path.write_text(json.dumps(coco))
    (root / "data" / "pics" / "broken.png").write_bytes(b"not a png")
    return str(path), ["--image-root", str(root / "data" / "pics")]


def write_saved_dataset(root: Path) -> tuple:
    """test_data's shapes dataset (ClassLabel class column; row 2's mask not binary) saved with save_to_disk, plus a
    row whose image bytes are a truncated PNG."""
    import datasets

    dataset, _ = shapes_dataset()
    mask = Image.fromarray(rect(32, 32, 2, 2, 20, 20).astype(np.uint8) * 255)
    corrupt = datasets.Dataset.from_dict({"picture": [{"bytes": b"\x89PNG truncated", "path": None}],
                                          "masks": [[mask]], "kind": [[0]]}, features=dataset.features)
    datasets.concatenate_datasets([dataset, corrupt]).save_to_disk(str(root / "data"))
    return str(root / "data"), DATASET_ARGS


FORMATS = {
    "folder": Format({"object"}, "broken.png", "unreadable image (UnidentifiedImageError",
                     {"a": (64, 64), "b": (64, 64), "c": (64, 64)}, 6),
    "label-maps": Format({"cat", "dog"}, "truncated.png", "unreadable label map truncated.png",
                         {"scene": (40, 32), "mirrored": (40, 32)}, 8),
    "coco": Format({"cat", "dog"}, "broken.png", "unreadable image (UnidentifiedImageError",
                   {"poly": (48, 40), "sub_rle": (32, 24)}, 4),
    "saved-dataset": Format({"leaf", "stem"}, "row-3", "unreadable image (UnidentifiedImageError",
                            {"row-0": (32, 32), "row-1": (32, 32)}, 3),
    "hub-dataset": Format({"leaf", "stem"}, "row-2 mask 0", "mask is not binary (values [7]",
                          {"row-0": (32, 32), "row-1": (32, 32)}, 3),
}
WRITERS = {"folder": write_folder, "label-maps": write_label_maps, "coco": write_coco_json,
           "saved-dataset": write_saved_dataset}


def command_lines(base: str, spec: str, extra: list, root: Path) -> dict:
    """The arguments of the three runs on `spec`: finetune.py for 2 steps (validated on `spec` too, at steps 0 and 2)
    into ROOT/out, evaluate.py of that adapter into ROOT/eval, finetune.py with --strict-data into ROOT/strict."""
    common = [*map(str, extra), *FAST]
    return {
        "train": (finetune.main, ["--model", base, "--train-data", spec, "--val-data", spec, "--output-dir",
                                  str(root / "out"), "--max-steps", "2", "--eval-every", "2", "--objects-per-image",
                                  "2", "--lr", "1e-2", "--overlay-images", "1", *common]),
        "evaluate": (evaluate.main, ["--model", base, "--adapter", str(root / "out"), "--data", spec, "--output-dir",
                                     str(root / "eval"), *common]),
        "strict": (finetune.main, ["--model", base, "--train-data", spec, "--output-dir", str(root / "strict"),
                                   "--max-steps", "2", "--objects-per-image", "2", "--strict-data", *common]),
    }


def train_score_and_refuse(base: str, spec: str, extra: list, root: str) -> dict:
    """The `command_lines` runs in-process as the command line runs them (under `run_tool`): for each, what it printed,
    its exit status and its error message (stderr)."""
    results = {}
    for name, (main, argv) in command_lines(base, spec, extra, Path(root)).items():
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
        printed, errors = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
                code = run_tool(lambda: main(argv))  # noqa: B023 (run_tool calls it at once)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        results[name] = {"printed": printed.getvalue(), "code": code, "error": errors.getvalue()}
    return results


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("formats") / "base"
    trainable_random_sam().save_pretrained(path)
    return path


def run_on_the_hub(base: Path, tmp_path: Path) -> dict:
    """In a child process with the local Hub: test_data's shapes dataset pushed twice, trained and scored by id at the
    first commit's sha."""
    from hub_server import HubServer

    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from accelerate.state import AcceleratorState
from sam_split.tools.cli import run_tool
from test_data import push_shapes_twice
from test_formats_end_to_end import DATASET_ARGS, command_lines, train_score_and_refuse
shas = push_shapes_twice("tester/leaves", {str(tmp_path)!r})
extra = DATASET_ARGS + ["--data-revision", shas[0]]
results = train_score_and_refuse({str(base)!r}, "tester/leaves", extra, {str(tmp_path)!r})
print("RESULTS", json.dumps(results), flush=True)
# The strict run once more under the tools' runner: this process ends as `python finetune.py --strict-data` would.
from sam_split.tools.cli import run_tool
main, argv = command_lines({str(base)!r}, "tester/leaves", extra, Path({str(tmp_path / "cli")!r}))["strict"]
AcceleratorState._reset_state(reset_partial_state=True)
sys.exit(run_tool(lambda: main(argv)))
"""
    with HubServer(tmp_path / "hub", token="secret") as hub:
        child = subprocess.run([sys.executable, "-c", code], env=hub_env(hub.url, tmp_path / "hf", token="secret"),
                               capture_output=True, text=True, timeout=300)
    assert "RESULTS " in child.stdout, child.stderr[-4000:]
    results = json.loads(child.stdout.split("RESULTS ", 1)[1].splitlines()[0])
    results["process"] = {"returncode": child.returncode, "stderr": child.stderr}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
def test_format_trains_scores_and_refuses_its_broken_file_with_strict_data(base, tmp_path, name):
    expected = FORMATS[name]
    if name == "hub-dataset":
        results = run_on_the_hub(base, tmp_path)
        # The pinned first commit (3 rows), not the newest (6 rows).
        assert "tester/leaves[train] (datasets: 3 rows)" in results["train"]["printed"]
    else:
        spec, extra = WRITERS[name](tmp_path)
        results = train_score_and_refuse(str(base), spec, extra, str(tmp_path))
    out, scored = tmp_path / "out", tmp_path / "eval"
    classes = expected.classes

    # Training: the broken sample named with its reason, the rest trained and validated per class of the format.
    train = results["train"]
    assert train["code"] == 0, train
    assert skipped(train["printed"])[expected.broken].startswith(expected.reason), train["printed"]
    assert f"{expected.images} images, {expected.objects} objects (" in train["printed"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    entries = metrics(out)
    assert [e["step"] for e in entries if "loss" in e] == [1, 2]
    assert all(np.isfinite(e["loss"]) for e in entries if "loss" in e)
    validations = [e for e in entries if "val_dice" in e]
    assert [e["step"] for e in validations] == [0, 2]
    for entry in validations:
        assert set(entry["val_classes"]) == classes
        assert sum(c["objects"] for c in entry["val_classes"].values()) == expected.objects
    results_file = json.loads((out / "eval_results.json").read_text())
    assert set(results_file["base"]["classes"]) == set(results_file["fine_tuned"]["classes"]) == classes
    assert list((out / "overlays" / "step-00000002").glob("*.png"))

    # evaluate.py of the adapter on the same data: per class and overall Dice and IoU, masks and overlays.
    scoring = results["evaluate"]
    assert scoring["code"] == 0, scoring
    assert skipped(scoring["printed"])[expected.broken].startswith(expected.reason)
    written = json.loads((scored / "metrics.json").read_text())
    assert set(written["classes"]) == classes
    for scores in [written, *written["classes"].values()]:
        assert 0 <= scores["dice"] <= 1 and 0 <= scores["iou"] <= 1, scores
    assert 0 <= written["image_dice"] <= 1 and 0 <= written["image_iou"] <= 1
    assert (written["images"], written["objects"]) == (expected.images, expected.objects)
    assert sum(c["objects"] for c in written["classes"].values()) == expected.objects
    assert {obj["class"] for image in written["per_image"] for obj in image["objects"]} == classes
    assert sorted(Path(image["name"]).stem for image in written["per_image"]) == sorted(expected.sizes)
    assert sorted(path.stem for path in (scored / "overlays").glob("*.png")) == sorted(expected.sizes)
    masks = sorted((scored / "masks").rglob("*.png"))
    assert len(masks) == expected.objects
    for path in masks:  # one folder per image, each mask at its image's original size
        assert Image.open(path).size == expected.sizes[path.parent.name], path

    # --strict-data: the same data refused before training, with a message (not a traceback) naming the broken file.
    strict = results["strict"]
    assert strict["code"] == 1 and strict["error"].startswith("error: ") and "Traceback" not in strict["error"], strict
    assert f"\n  {expected.broken}: {expected.reason}" in strict["error"]
    assert not (tmp_path / "strict" / "adapter_config.json").exists()
    if "process" in results:  # the Hub child ran the strict run uncaught too: status 1, the message, no traceback
        process = results["process"]
        assert process["returncode"] == 1 and "Traceback" not in process["stderr"], process["stderr"][-4000:]
        assert process["stderr"].rstrip().endswith(strict["error"].rstrip().split("\n")[-1])
        assert f"\n  {expected.broken}: {expected.reason}" in process["stderr"]
