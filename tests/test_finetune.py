"""finetune.py and evaluate.py on a tiny SAM (64x64 images) and synthetic shapes: it learns, trains only what it should,
resumes exactly (also past a corrupt checkpoint), survives bad data and bad settings, stops before a non-finite step,
keeps the best adapter, reports to TensorBoard and PNGs, runs as 2 DDP processes, and publishes an adapter that
reloads pinned to revisions, with `AutoPeftModel` too, and can be published again after a failed push."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from hub_server import HubServer
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from sam_testing import hub_env, max_abs_diff, random_stock_sam, run_python, sample_inputs, tiny_sam_config
from transformers import SamModel

from sam_split import SamSplitModel, evaluate, finetune
from sam_split.tools import segmentation, training
from sam_split.tools.cli import ToolError, run_tool
from sam_split.tools.data import DataError, DataOptions, open_source, scan
from sam_split.tools.family import trainable_
from sam_split.tools.processing import model_processor
from sam_split.tools.synthetic import write_shapes

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port for the DDP rendezvous: accelerate's fixed default (29500) can hang on a port still held
    by another job."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the data was checked")


NOT_MOVED = "validation has not moved at all"  # finetune's line when no validation differs from step 0's
# Shared by the runs below: in-process, no DataLoader workers (their start-up costs more than these tiny steps).
FAST = ["--num-workers", "0", "--batch-size", "4"]


def trainable_random_sam() -> SamSplitModel:
    """Random weights a few dozen steps can learn from (`family.trainable_`, as `random:` sources are built)."""
    return SamSplitModel.from_sam(trainable_(random_stock_sam(tiny_sam_config())))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    trainable_random_sam().save_pretrained(root / "base")
    return {"root": root, "base": root / "base", "train": write_shapes(root / "train", 12, seed=0),
            "val": write_shapes(root / "val", 4, seed=1)}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process run builds its own Accelerator (mixed precision differs between runs)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run(data, out, *extra):
    return finetune.main(["--model", str(data["base"]), "--train-data", str(data["train"]), "--output-dir", str(out),
                          *FAST, *map(str, extra)])


def metrics(out: Path) -> list:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def changed_parameters(model: PeftModel, base: SamSplitModel) -> dict:
    """Name -> changed? for every parameter of `model`, compared with the base weight it started from."""
    base_state = base.state_dict()
    changed = {}
    for name, param in model.named_parameters():
        base_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        base_name = re.sub(r"mask_decoder\.(original_module|modules_to_save\.default)\.", "mask_decoder.", base_name)
        if "lora_" in name:
            changed[name] = bool(param.abs().max() > 0) if "lora_B" in name else True  # B starts at zero
        else:
            changed[name] = max_abs_diff(param, base_state[base_name]) > 0
    return changed


def mask_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs, multimask_output=False).pred_masks


@pytest.fixture(scope="module")
def decoder_run(data):
    """40 steps of LoRA + mask decoder, validated every 20, merged into a stock SamModel at the end."""
    AcceleratorState._reset_state(reset_partial_state=True)
    out = data["root"] / "decoder-run"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        model = run(data, out, "--val-data", data["val"], "--train-decoder", "--lr", "1e-2", "--max-steps", 40,
                    "--eval-every", 20, "--merge-to-sam", data["root"] / "merged", "--report-to", "tensorboard",
                    "--overlay-images", 2)
    (out.parent / "decoder-run.log").write_text(printed.getvalue())
    return model, out


@pytest.fixture(scope="module")
def lora_run(data):
    """3 steps of LoRA alone, with dropout, box + point prompts and gradient accumulation."""
    AcceleratorState._reset_state(reset_partial_state=True)
    out = data["root"] / "lora-run"
    model = run(data, out, "--lr", "1e-2", "--max-steps", 3, "--prompt", "box+point", "--num-points", 2,
                "--gradient-accumulation-steps", 2)
    return model, out


@pytest.mark.slow
def test_loss_falls_and_validation_iou_rises(decoder_run):
    _, out = decoder_run
    losses = [entry["loss"] for entry in metrics(out) if "loss" in entry]
    ious = {entry["step"]: entry["val_iou"] for entry in metrics(out) if "val_iou" in entry}
    assert sorted(ious) == [0, 20, 40]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert ious[40] > ious[0] + 0.2, ious
    log = (out.parent / "decoder-run.log").read_text()
    assert "training runs 40 steps (--max-steps) = 13.3 epochs" in log and NOT_MOVED not in log


def test_decoder_run_trains_lora_and_decoder_only_and_reloads(data, decoder_run):
    model, out = decoder_run
    base = SamSplitModel.from_pretrained(data["base"])
    changed = changed_parameters(model, base)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert {name for name, moved in changed.items() if moved} <= trainable
    assert trainable == {n for n in changed if "lora_" in n or ".modules_to_save.default." in n}
    assert all(changed[n] for n in trainable if "lora_B" in n)
    assert sum(changed[n] for n in trainable if "mask_decoder" in n) > 0.9 * sum("mask_decoder" in n for n in trainable)
    assert all(".vision_encoder." in n for n in changed if "lora_" in n)  # `q`/`v` hit the vision encoder alone

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(data["base"].resolve())
    assert config["modules_to_save"] == ["mask_decoder"] and sorted(config["target_modules"]) == ["q", "v"]
    inputs = sample_inputs(base.config)
    reloaded = PeftModel.from_pretrained(base, out)
    assert max_abs_diff(mask_logits(reloaded, inputs), mask_logits(model, inputs)) < 1e-5
    merged = SamModel.from_pretrained(data["root"] / "merged")
    assert type(merged) is SamModel
    assert max_abs_diff(mask_logits(merged, inputs), mask_logits(model, inputs)) < 1e-4


@pytest.mark.slow
def test_lora_run_changes_only_lora_weights(data, lora_run):
    model, out = lora_run
    changed = changed_parameters(model, SamSplitModel.from_pretrained(data["base"]))
    assert {name for name, moved in changed.items() if moved} == {n for n in changed if "lora_" in n}
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert json.loads((out / "adapter_config.json").read_text())["revision"] is None  # local base: no revision


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_weights(data, lora_run, tmp_path):
    model, _ = lora_run
    checkpointed = run(data, tmp_path / "gc", "--lr", "1e-2", "--max-steps", 3, "--prompt", "box+point",
                       "--num-points", 2, "--gradient-accumulation-steps", 2, "--gradient-checkpointing")
    expected = dict(model.named_parameters())
    for name, param in checkpointed.named_parameters():
        if "lora_" in name:
            assert max_abs_diff(param, expected[name]) < 1e-6, name


def test_bf16_mixed_precision_runs(data, tmp_path):
    run(data, tmp_path / "bf16", "--max-steps", 2, "--mixed-precision", "bf16")
    assert all(np.isfinite(entry["loss"]) for entry in metrics(tmp_path / "bf16"))


@pytest.mark.slow
def test_resume_continues_the_same_run(data, tmp_path):
    # 12 samples, batch 3 x accumulation 2: 2 steps per epoch, so the interruption and the resumed part span epochs.
    args = ["--max-steps", 6, "--save-every", 3, "--keep-checkpoints", 0, "--lr", "1e-2", "--batch-size", 3,
            "--gradient-accumulation-steps", 2, "--prompt", "box+point", "--lora-dropout", 0.2, "--train-decoder"]
    run(data, tmp_path / "whole", *args)
    AcceleratorState._reset_state(reset_partial_state=True)
    # An interrupted run: only the step-3 checkpoint exists.
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-00000003"
    shutil.copytree(checkpoint, tmp_path / "resumed" / "checkpoints" / checkpoint.name)
    run(data, tmp_path / "resumed", *args, "--resume")

    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    assert max(max_abs_diff(whole[name], resumed[name]) for name in whole) <= 1e-6
    whole_losses = {e["step"]: e["loss"] for e in metrics(tmp_path / "whole") if e["step"] > 3}
    resumed_losses = {e["step"]: e["loss"] for e in metrics(tmp_path / "resumed")}
    assert resumed_losses == pytest.approx(whole_losses, abs=1e-6)

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ToolError, match="differ from the checkpoint.*lora_r"):
        run(data, tmp_path / "resumed", *args, "--resume", "--lora-r", 4, "--max-steps", 9)


def test_reports_to_tensorboard_and_draws_overlays_and_curves(decoder_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = decoder_run
    [event_file] = (out / "runs" / "finetune").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "val_dice", "val_iou", "val_loss", "val_dice/object"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val_dice")] == [0, 20, 40]
    assert len(events.Scalars("loss")) == 40
    val_dice = {e["step"]: e["val_dice"] for e in metrics(out) if "val_dice" in e}
    assert events.Scalars("val_dice")[-1].value == pytest.approx(val_dice[40], abs=1e-6)
    assert sorted(tags["images"]) == ["overlays/0000-img00", "overlays/0001-img01"]
    image = events.Images("overlays/0000-img00")[-1]
    assert image.step == 40 and (image.width, image.height) == (2 * 64 + 4, 64 + 14)
    for step in (0, 20, 40):  # the same fixed images at each validation
        pictures = sorted(p.name for p in (out / "overlays" / f"step-{step:08d}").iterdir())
        assert pictures == ["0000-img00.png", "0001-img01.png"]
    with Image.open(out / "curves.png") as curves:
        assert curves.size[0] > 500 and curves.size[1] > 200


def test_base_and_fine_tuned_scores_side_by_side(decoder_run):
    _, out = decoder_run
    results = json.loads((out / "eval_results.json").read_text())
    val = {e["step"]: e for e in metrics(out) if "val_dice" in e}
    assert results["base"]["step"] == 0 and results["fine_tuned"]["step"] == 40
    for key, step in (("base", 0), ("fine_tuned", 40)):
        assert results[key]["dice"] == val[step]["val_dice"] and results[key]["iou"] == val[step]["val_iou"]
        assert results[key]["classes"]["object"]["objects"] == 4
    assert results["fine_tuned"]["dice"] > results["base"]["dice"] + 0.2
    assert 0 <= results["fine_tuned"]["iou"] <= results["fine_tuned"]["dice"] <= 1  # IoU <= Dice, always


def test_evaluate_py_scores_the_base_and_the_adapter_as_validation_did(data, decoder_run, tmp_path):
    _, out = decoder_run
    val = {e["step"]: e for e in metrics(out) if "val_dice" in e}
    common = ["--data", str(data["val"]), "--num-workers", "0", "--overlay-images", "1"]
    AcceleratorState._reset_state(reset_partial_state=True)
    base = evaluate.main(["--model", str(data["base"]), "--output-dir", str(tmp_path / "base"), *common])
    AcceleratorState._reset_state(reset_partial_state=True)
    tuned = evaluate.main(["--model", str(data["base"]), "--adapter", str(out), "--output-dir",
                           str(tmp_path / "tuned"), *common])
    assert base["dice"] == pytest.approx(val[0]["val_dice"], abs=1e-6)
    assert tuned["dice"] == pytest.approx(val[40]["val_dice"], abs=1e-6)
    assert tuned["iou"] == pytest.approx(val[40]["val_iou"], abs=1e-6)
    written = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert written["classes"]["object"]["dice"] == pytest.approx(tuned["dice"]) and written["objects"] == 4
    assert [obj["class"] for image in written["per_image"] for obj in image["objects"]] == ["object"] * 4
    masks = sorted((tmp_path / "tuned" / "masks").rglob("*.png"))
    assert len(masks) == 4 and Image.open(masks[0]).size == (64, 64)
    assert [p.name for p in (tmp_path / "tuned" / "overlays").iterdir()] == ["img00.png"]
    # A mask written to disk is the one scored: its Dice against the ground truth matches metrics.json.
    truth = np.asarray(Image.open(data["val"] / "masks" / "img00_0.png")) > 0
    predicted = np.asarray(Image.open(tmp_path / "tuned" / "masks" / "img00" / "000-img00_0.png")) > 0
    assert segmentation.dice_iou(predicted, truth)[0] == pytest.approx(written["per_image"][0]["objects"][0]["dice"])
    assert not (tmp_path / "tuned.partial").exists()
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(data["base"]), "--output-dir", str(tmp_path / "tuned"), *common])


@pytest.mark.slow
def test_best_checkpoint_is_the_saved_adapter_and_early_stop(data, tmp_path, monkeypatch, capsys):
    """Validation scores forced to peak at step 2: the adapter is step 2's, and patience 1 stops at step 4."""
    dice_by_step = iter([0.1, 0.9, 0.5, 0.95])
    real = training.summarize

    def fixed_scores(records, class_names):
        return {**real(records, class_names), "dice": next(dice_by_step)}

    monkeypatch.setattr(training, "summarize", fixed_scores)
    out = tmp_path / "out"
    run(data, out, "--val-data", data["val"], "--eval-every", 2, "--max-steps", 8, "--lr", "1e-2", "--save-every", 2,
        "--keep-checkpoints", 0, "--metric-for-best", "dice", "--early-stopping-patience", 1)
    assert "early stop at step 4" in capsys.readouterr().out
    assert max(e["step"] for e in metrics(out)) == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    adapter = load_file(out / "adapter_model.safetensors")
    at_step = {step: load_file(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors") for step in (2, 4)}
    for step, expected_equal in ((2, True), (4, False)):
        same = all(torch.equal(tensor, at_step[step][name.replace(".weight", ".default.weight")])
                   for name, tensor in adapter.items())
        assert same is expected_equal, step
    assert json.loads((out / "eval_results.json").read_text())["fine_tuned"]["step"] == 2


@pytest.mark.parametrize("case", ["file", "not-empty", "read-only", "lr", "nan-lr", "wandb"])
def test_bad_output_dir_or_lr_is_refused_before_anything_loads(tmp_path, capsys, case):
    output = tmp_path / "out"
    extra = []
    if case == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb"):
            pytest.skip("wandb is installed")
        extra = ["--report-to", "wandb"]
    elif case == "file":
        output.write_text("not a folder")
    elif case == "not-empty":
        output.mkdir()
        (output / "notes.txt").write_text("the user's")
    elif case == "read-only":
        output = Path("/sys/sam-split-test-output")  # a read-only file system, even for root
    elif case in ("lr", "nan-lr"):
        extra = ["--lr", "1e39" if case == "lr" else "nan"]
    with pytest.raises(SystemExit) as raised:
        finetune.parse_args(["--model", "no/such-model", "--train-data", "nowhere", "--output-dir", str(output),
                             "--max-steps", "1", *extra])
    assert raised.value.code == 2
    expected = {"file": "exists and is not a folder; choose a new folder",
                "not-empty": "exists and is not empty; choose a new folder, or pass --resume to continue its run",
                "read-only": "is not writable",
                "lr": "argument --lr: expected a finite number > 0 and <= 1, got '1e39'",
                "nan-lr": "argument --lr: expected",
                "wandb": "--report-to wandb needs the `wandb` package"}[case]
    assert expected in capsys.readouterr().err


def test_non_finite_gradients_stop_before_the_step_and_no_checkpoint_holds_them(data, tmp_path, monkeypatch):
    """A step whose loss is finite but whose gradients are NaN (sqrt at 0): nothing of it may reach a checkpoint."""
    real, calls = segmentation.segmentation_loss, []

    def poisoned(logits, target, pixel_loss):
        calls.append(1)
        loss = real(logits, target, pixel_loss)
        return loss + torch.sqrt(logits.sum() * 0) if len(calls) == 2 else loss

    monkeypatch.setattr(segmentation, "segmentation_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(ToolError, match="gradients are not finite at step 2; the weights of step 1 are kept"):
        run(data, out, "--max-steps", 3, "--save-every", 1, "--keep-checkpoints", 0, "--lr", "1e-2")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]
    saved = load_file(out / "checkpoints" / "step-00000001" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    assert not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(data, tmp_path, capsys):
    args = ["--max-steps", 2, "--save-every", 1, "--keep-checkpoints", 0, "--lr", "1e-2"]
    run(data, tmp_path / "whole", *args[:1], 3, *args[2:])
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "out"
    run(data, out, *args)
    newest = out / "checkpoints" / "step-00000002"
    (newest / "model.safetensors").write_bytes(b"truncated by a full disk")
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    run(data, out, "--max-steps", 3, *args[2:], "--resume")
    printed = capsys.readouterr().out
    assert f"checkpoint {newest} is unreadable" in printed and "falling back to" in printed
    assert "resumed from " + str(out / "checkpoints" / "step-00000001") in printed
    whole, resumed = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "whole", out))
    assert max(max_abs_diff(whole[name], resumed[name]) for name in whole) <= 1e-6

    # Only corrupt checkpoints: refused with the path, no traceback.
    for step in (1, 2, 3):
        (out / "checkpoints" / f"step-{step:08d}" / "run.json").write_text("{")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ToolError, match=f"checkpoint {out / 'checkpoints' / 'step-00000001'} is unreadable"):
        run(data, out, "--max-steps", 4, *args[2:], "--resume")


def write_bad_data(root: Path) -> Path:
    """3 good images plus one of each problem `scan` must count."""
    write_shapes(root, 3, seed=2)
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(root / "images" / "no_masks.png")
    Image.fromarray(noise).save(root / "images" / "empty.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "masks" / "empty_0.png")
    Image.fromarray(noise).save(root / "images" / "small.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(root / "masks" / "small_0.png")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "masks" / "broken_0.png")
    Image.fromarray(np.arange(64 * 64).reshape(64, 64).astype(np.uint8) % 4).save(root / "masks" / "img00_labels.png")
    (root / "masks" / "img01_1.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(root / "masks" / "orphan.png")
    return root


def test_bad_samples_are_counted_and_skipped(data, tmp_path, capsys):
    bad = write_bad_data(tmp_path / "bad")
    finetune.main(["--model", str(data["base"]), "--train-data", str(bad), "--output-dir", str(tmp_path / "out"),
                   "--max-steps", "1", *FAST])
    printed = capsys.readouterr().out
    assert "skipped 7 (" in printed and f"{bad} (folder: 7 images): 3 images, 3 objects" in printed
    for reason in ("image without masks", "empty mask", "mask is 32x32, image is 64x64", "unreadable image",
                   "mask is not binary", "unreadable mask", "mask without an image"):
        assert reason in printed, reason
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(DataError, match="7 bad samples"):
        run(data, tmp_path / "strict", "--max-steps", 1, "--strict-data", "--val-data", bad)
    assert not (tmp_path / "strict" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "layout, message",
    [("missing", "does not exist"), ("no-masks-folder", "neither a `datasets` folder nor has masks/"),
     ("all-bad", "no usable"), ("dataset-column", "no column")],
)
def test_unusable_data_fails_before_training(data, tmp_path, monkeypatch, layout, message):
    path = tmp_path / "data"
    if layout == "no-masks-folder":
        (path / "images").mkdir(parents=True)
    elif layout == "all-bad":
        write_bad_data(path)
        shutil.rmtree(path / "masks")
        (path / "masks").mkdir()
    elif layout == "dataset-column":
        import datasets

        datasets.Dataset.from_dict({"picture": [np.zeros((4, 4, 3), np.uint8)]}).save_to_disk(str(path))
    monkeypatch.setattr(finetune, "load_model", refuse_to_load)  # the data is checked before the weights load
    with pytest.raises(DataError, match=message):
        finetune.main(["--model", str(data["base"]), "--train-data", str(path), "--output-dir",
                       str(tmp_path / "out"), "--max-steps", "1", *FAST])
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


def test_saved_dataset_gives_the_same_samples_as_the_folder(data, tmp_path):
    import datasets

    names = sorted(p.stem for p in (data["train"] / "images").iterdir())
    rows = {"image": [str(data["train"] / "images" / f"{n}.png") for n in names],
            "mask": [[str(data["train"] / "masks" / f"{n}_0.png")] for n in names]}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Sequence(datasets.Image())})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))

    config = SamSplitModel.from_pretrained(data["base"]).config
    processor = model_processor(config)

    def prompted(path):
        source = open_source(str(path), DataOptions(split="train"))
        images = scan(source, processor, strict=True, log=print)
        return segmentation.PromptedImages(source, images, processor, "box+point", 2, 1, 0.1, seed=0)

    from_folder, from_dataset = prompted(data["train"]), prompted(tmp_path / "saved")
    assert len(from_folder) == len(from_dataset) == 12
    for key in [0, (3, 5), (0, 11)]:
        expected, got = from_folder[key], from_dataset[key]
        assert expected.keys() == got.keys() and expected["labels"].sum() > 0
        for name in expected:
            if torch.is_tensor(expected[name]):
                assert torch.equal(expected[name], got[name]), (key, name)
    run(data, tmp_path / "out", "--max-steps", 1, "--val-data", tmp_path / "saved", "--val-split", "train")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_two_ddp_processes_end_with_identical_weights(data, decoder_run, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(ROOT / "finetune.py"),
               "--cpu", "--model", str(data["base"]), "--train-data", str(data["train"]), "--val-data",
               str(data["val"]), "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--train-decoder",
               "--lr", "1e-2", "--save-every", "1", "--keep-checkpoints", "1", *FAST]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    digests = re.search(r"trainable weights sha256 per process: \[(.*)\]", result.stdout).group(1).split(", ")
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "2 process(es) x batch 4" in result.stdout
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["mask_decoder"]
    # Both processes saved into one checkpoint folder (each its RNG state); the older one and no build folder is left.
    checkpoints = tmp_path / "out" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000002"]
    assert {"run.json", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoints.glob("*/*")}
    # gather_for_metrics: the 4 validation images once each, though the second process got only padding to score.
    validations = [e for e in metrics(tmp_path / "out") if "val_dice" in e]
    assert [e["val_classes"]["object"]["objects"] for e in validations] == [4, 4]
    single_process = next(e for e in metrics(decoder_run[1]) if e["step"] == 0)  # the same base model at step 0
    for name in ("val_dice", "val_iou", "val_loss"):
        assert validations[0][name] == pytest.approx(single_process[name], abs=1e-5), name


def isolated_python(code: str, env: dict, cwd: Path) -> str:
    """Run `code` as a user who has only the Hub and the libraries: `-S` skips site-packages' .pth files (so the
    editable install of this package is not importable), PYTHONPATH gives the plain site-packages back."""
    import sysconfig

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    result = subprocess.run([sys.executable, "-S", "-c", code], env={**env, "PYTHONPATH": os.pathsep.join(paths)},
                            cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_push_to_hub_card_autopeft_and_publish_again(data, tmp_path):
    token = "finetune-secret"
    with HubServer(tmp_path / "hub", token=token) as hub:
        env = hub_env(hub.url, tmp_path / "hf", token=token)
        outputs = tmp_path / "trained.pt"
        train = f"""
import os, shutil, sys, torch
from huggingface_hub import HfApi, ModelCard, ModelCardData
sys.path.insert(0, {str(ROOT / "tests")!r})
from sam_split import finetune
from sam_split.tools.cli import ToolError
from sam_testing import sample_inputs
api = HfApi()
api.create_repo("tester/sam-base")
shutil.copytree({str(data["base"])!r}, {str(tmp_path / "base-repo")!r})
card = ModelCard(f"---\\n{{ModelCardData(license='mit', library_name='transformers').to_yaml()}}\\n---\\n# base\\n")
card.save({str(tmp_path / "base-repo" / "README.md")!r})
base_sha = api.upload_folder(repo_id="tester/sam-base", folder_path={str(tmp_path / "base-repo")!r}).oid
# The adapter repo already holds a file of an upload not ours: the publish refuses to delete it unless --replace-all,
# and then leaves exactly the adapter's files.
api.create_repo("tester/sam-adapter")
api.upload_file(repo_id="tester/sam-adapter", path_or_fileobj=b"old", path_in_repo="old/adapter_model.bin")
os.environ["HF_TOKEN"] = "a-refused-token"  # the push at the end fails; the trained adapter must survive it
try:
    finetune.main(["--model", "tester/sam-base", "--base-revision", base_sha, "--train-data", {str(data["train"])!r},
                   "--val-data", {str(data["val"])!r}, "--eval-every", "2", "--output-dir", {str(tmp_path / "out")!r},
                   "--max-steps", "2", "--train-decoder", "--lr", "1e-2", "--push-to", "tester/sam-adapter",
                   "--replace-all", *{FAST!r}])
except (SystemExit, ToolError) as error:
    print("PUSH FAILED", error)
os.environ["HF_TOKEN"] = {token!r}
try:
    finetune.main(["--output-dir", {str(tmp_path / "out")!r}, "--publish-only", "--push-to", "tester/sam-adapter"])
except ToolError as error:
    print("REFUSED", error)
model = finetune.main(["--output-dir", {str(tmp_path / "out")!r}, "--publish-only", "--push-to", "tester/sam-adapter",
                       "--replace-all"])
with torch.no_grad():
    logits = model.eval()(**sample_inputs(model.config), multimask_output=False).pred_masks
torch.save(logits, {str(outputs)!r})
print("BASE", base_sha)

# Trained on a local folder: published only once its base is named on the Hub (the same weights), never by a path.
from accelerate.state import AcceleratorState
AcceleratorState._reset_state(reset_partial_state=True)
local = {str(tmp_path / "local-run")!r}
finetune.main(["--model", {str(data["base"])!r}, "--train-data", {str(data["train"])!r}, "--output-dir", local,
               "--max-steps", "1", *{FAST!r}])
finetune.main(["--output-dir", local, "--publish-only", "--push-to", "tester/local-adapter", "--model",
               "tester/sam-base", "--base-revision", base_sha])
from huggingface_hub import hf_hub_download
import json
print("LOCAL CONFIG", json.dumps(json.load(open(hf_hub_download("tester/local-adapter", "adapter_config.json")))))
print("LOCAL CARD", json.dumps(open(hf_hub_download("tester/local-adapter", "README.md")).read()))
"""
        printed = run_python(train, env, replace_env=True)
        failed = re.search(r"PUSH FAILED (error: )?upload to tester/sam-adapter at \S+ failed(.*)", printed)
        assert failed and "HfHubHTTPError" in failed.group(2) and "401" in failed.group(2), printed[-3000:]
        assert re.search("[Nn]othing was committed", failed.group(2)), failed.group(0)
        assert f"--output-dir {tmp_path / 'out'} --publish-only --push-to tester/sam-adapter" in printed
        refused = re.search(r"REFUSED (.*)", printed).group(1)
        assert "no push of sam-split wrote" in refused and "old/adapter_model.bin" in refused, refused
        base_sha = re.search(r"BASE ([0-9a-f]+)", printed).group(1)
        local_config = json.loads(re.search(r"LOCAL CONFIG (.*)", printed).group(1))
        assert (local_config["base_model_name_or_path"], local_config["revision"]) == ("tester/sam-base", base_sha)
        local_card = json.loads(re.search(r"LOCAL CARD (.*)", printed).group(1))
        assert "base_model: tester/sam-base" in local_card and str(tmp_path) not in local_card
        # the data by its folder's name and what it holds, never by a path of this machine
        train_folder = f"{data['train'].parent.name}/{data['train'].name}"
        assert f"- training: `{train_folder}` (a local dataset; folder: 12 images)" in local_card
        adapter_sha = re.search(r"pushed adapter to tester/sam-adapter at revision (\S+)", printed).group(1)
        assert re.fullmatch(r"[0-9a-f]{40}", adapter_sha) and adapter_sha != base_sha
        # Only the adapter, its config and card: no checkpoints, metrics, overlays or run record, nothing older.
        assert sorted(hub.git("tester/sam-adapter", "ls-tree", "-r", "--name-only", adapter_sha).split()) == [
            ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert {"metrics.jsonl", "run.json", "eval_results.json"} <= {p.name for p in (tmp_path / "out").iterdir()}

        # A user with the Hub and the libraries only: no sam_split importable, a fresh cache, pinned revisions.
        load = f"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("sam_split") is None, "the package must not be importable here"
from huggingface_hub import ModelCard, hf_hub_download
from peft import AutoPeftModel
sys.path.insert(0, {str(ROOT / "tests")!r})
from sam_testing import sample_inputs
config = json.load(open(hf_hub_download("tester/sam-adapter", "adapter_config.json", revision="{adapter_sha}")))
assert config["base_model_name_or_path"] == "tester/sam-base" and config["revision"] == "{base_sha}", config
card = hf_hub_download("tester/sam-adapter", "README.md", revision="{adapter_sha}")
print("CARD", json.dumps(ModelCard.load(card).data.to_dict()))
model = AutoPeftModel.from_pretrained("tester/sam-adapter", revision="{adapter_sha}", trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**sample_inputs(model.config), multimask_output=False).pred_masks
print("CLASS", type(model.base_model.model).__name__)
print("DIFF", (logits - torch.load({str(outputs)!r})).abs().max().item())
"""
        printed = isolated_python(load, {**env, "HF_HOME": str(tmp_path / "hf-fresh")}, cwd=tmp_path)
    assert float(re.search(r"DIFF (\S+)", printed).group(1)) < 1e-5
    assert "CLASS SamSplitModel" in printed
    card = json.loads(re.search(r"CARD (.*)", printed).group(1))
    assert card["base_model"] == "tester/sam-base" and card["license"] == "mit" and card["library_name"] == "peft"
    [result] = card["model-index"][0]["results"]
    assert result["dataset"]["name"] == f"{data['val'].parent.name}/val"
    assert [m["type"] for m in result["metrics"]] == ["dice", "iou"]
    assert 0 <= result["metrics"][0]["value"] <= 1


# ------------------------------------------------------------------------------------------- settings and mistakes


@pytest.mark.parametrize("flag, value", [
    ("--eval-every", "0"), ("--eval-every", "-2"), ("--lora-dropout", "1.5"), ("--lora-dropout", "nan"),
    ("--weight-decay", "nan"), ("--seed", "-1"), ("--num-workers", "-1"), ("--box-jitter", "nan"),
    ("--box-jitter", "-5"), ("--max-grad-norm", "nan"), ("--iou-loss-weight", "nan"), ("--warmup-steps", "-1"),
    ("--save-every", "-1"), ("--keep-checkpoints", "-1"), ("--early-stopping-patience", "-1"),
    ("--lora-alpha", "inf"), ("--objects-per-image", "0"),
])
def test_every_flag_is_checked_at_parse_time(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as raised:
        finetune.parse_args(["--model", "no/such-model", "--train-data", "nowhere", "--val-data", "nowhere",
                             "--metric-for-best", "dice", "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
                             flag, value])
    assert raised.value.code == 2
    assert f"argument {flag}: expected " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--num-workers", "-1"), ("--batch-size", "0"),
                                         ("--num-negative-points", "-1")])
def test_evaluate_flags_are_checked_at_parse_time(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as raised:
        evaluate.parse_args(["--model", "no/such-model", "--data", "nowhere", "--output-dir", str(tmp_path / "o"),
                             flag, value])
    assert raised.value.code == 2 and f"argument {flag}: expected " in capsys.readouterr().err


def test_push_to_refuses_a_local_base_before_training(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "a-token")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--model", str(data["base"]), "--train-data", str(data["train"]), "--output-dir",
                             str(tmp_path / "out"), "--max-steps", "1", "--push-to", "me/adapter"])
    assert f"--model {data['base']} is a local folder, and a published adapter must name a base" in \
        capsys.readouterr().err


@pytest.mark.parametrize("kind", ["adapter", "not-a-model", "stock", "typo"])
def test_model_that_is_not_a_sam_split_model_is_one_line(data, tmp_path, monkeypatch, capsys, kind):
    folder = tmp_path / kind
    if kind == "adapter":
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(data["base"])}))
        expected = "is a PEFT adapter, not a model: pass its base model as --model"
    elif kind == "not-a-model":
        write_shapes(folder, 1, seed=0)
        expected = "holds no config.json: expected a SamSplitModel"
    elif kind == "stock":
        random_stock_sam().save_pretrained(folder)
        expected = "is a stock SAM checkpoint (fused qkv): convert it first with `python push.py --source"
    else:
        folder = tmp_path / "./nope/base"
        expected = "no such file or folder"
    monkeypatch.setattr(finetune, "load_model", refuse_to_load)
    for main, argv in ((finetune.main, ["--train-data", str(data["train"]), "--max-steps", "1"]),
                       (evaluate.main, ["--data", str(data["val"])])):
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises((ToolError, SystemExit)) as raised:  # a parse error (exit 2) where no file is read
            main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), *argv, *FAST])
        assert expected in str(raised.value) + capsys.readouterr().err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_validation_progress_and_a_tie_with_the_base_says_so_in_the_card(data, tmp_path, monkeypatch, capsys):
    """Validation scores that never beat step 0's: the adapter is the untrained one, and card and log say it."""
    monkeypatch.setattr(training, "summarize", lambda records, names: {**segmentation.summarize(records, names),
                                                                        "dice": 0.5})
    out = tmp_path / "out"
    run(data, out, "--val-data", data["val"], "--eval-every", 1, "--max-steps", 2, "--lr", "1e-2",
        "--metric-for-best", "dice")
    printed = capsys.readouterr()
    assert "no validation beat the base model" in printed.out
    assert "validation at step 1" in printed.err  # a progress bar per validation
    card = (out / "README.md").read_text()
    assert "The adapter is the one of step 0" in card and "No validation beat the base model" in card
    assert json.loads((out / "run.json").read_text())["adapter_step"] == 0
    assert json.loads((out / "eval_results.json").read_text())["fine_tuned"]["step"] == 0


def test_max_steps_has_a_default(data, tmp_path):
    settings = finetune.parse_args(["--model", str(data["base"]), "--train-data", str(data["train"]),
                                    "--output-dir", str(tmp_path / "out")])
    assert settings.max_steps == finetune.DEFAULT_MAX_STEPS == 1000


def test_validation_that_has_not_moved_at_all_says_so(data, tmp_path, monkeypatch, capsys):
    """Every validation scoring exactly as step 0 (as the issue's 40 steps of random:sam-tiny at the old defaults did:
    Dice in the 6th digit, loss identical): one line says so, and what to change."""
    real_validate, first = training.validate, []

    def frozen_validate(session, validation):
        entry, overlay_dir = real_validate(session, validation)
        first.append(first[0] if first else entry)
        return {**first[0], "step": entry["step"]}, overlay_dir

    monkeypatch.setattr(training, "validate", frozen_validate)
    run(data, tmp_path / "out", "--val-data", data["val"], "--eval-every", 1, "--max-steps", 2)
    [line] = [line for line in capsys.readouterr().out.splitlines() if NOT_MOVED in line]
    assert "step 2 scores exactly as step 0" in line and "--lr" in line and "--train-decoder" in line


@pytest.mark.slow
def test_interrupt_hint_unfinished_publish_refused_torn_metrics_resumed(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 3: exit 130 and where to resume from; the run's intermediate adapter is not published or
    merged without --allow-unfinished; a torn metrics.jsonl line is dropped on --resume; the finished run merges."""
    real_step, calls = training.train_step, []

    def interrupted_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", interrupted_at_step_3)
    out = tmp_path / "out"
    argv = ["--model", str(data["base"]), "--train-data", str(data["train"]), "--val-data", str(data["val"]),
            "--output-dir", str(out), "--max-steps", "3", "--eval-every", "1", "--save-every", "1",
            "--metric-for-best", "loss", "--lr", "1e-2", *FAST]
    assert run_tool(lambda: finetune.main(argv)) == 130
    printed = capsys.readouterr()
    assert "error: interrupted" in printed.err and "Traceback" not in printed.err
    assert (f"interrupted at step 2; the last checkpoint is {out / 'checkpoints' / 'step-00000002'}: run the same "
            "command with --resume") in printed.out
    assert json.loads((out / "run.json").read_text())["finished"] is False
    assert (out / "adapter_config.json").exists()  # the best adapter so far, written during the run

    monkeypatch.setenv("HF_TOKEN", "a-token")
    for publish in (["--merge-to-sam", str(tmp_path / "merged")], ["--push-to", "me/adapter"]):
        with pytest.raises(ToolError, match="holds an unfinished run .* pass --allow-unfinished"):
            finetune.main(["--output-dir", str(out), "--publish-only", *publish])
    # Even allowed, a push refuses a base that is a folder of this machine (before any network).
    with pytest.raises(ToolError, match="--push-to: the adapter's base is .*, a folder of this machine, not a Hub id"):
        finetune.main(["--output-dir", str(out), "--publish-only", "--push-to", "me/adapter", "--allow-unfinished"])
    assert not (tmp_path / "merged").exists()

    with (out / "metrics.jsonl").open("a") as file:
        file.write('{"step": 3, "loss": 0.')  # killed while writing
    monkeypatch.setattr(training, "train_step", real_step)
    AcceleratorState._reset_state(reset_partial_state=True)
    finetune.main([*argv, "--resume"])
    assert "dropped the torn last line of" in capsys.readouterr().out
    assert [e["step"] for e in metrics(out) if "loss" in e] == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["finished"] is True
    finetune.main(["--output-dir", str(out), "--publish-only", "--merge-to-sam", str(tmp_path / "merged")])
    assert SamModel.from_pretrained(tmp_path / "merged").config.model_type == "sam"


def test_training_image_deleted_mid_run_is_one_line_with_the_checkpoint(data, tmp_path, monkeypatch):
    train = tmp_path / "train"
    shutil.copytree(data["train"], train)
    real_batches = finetune.training_batches

    def delete_an_image_after_the_scan(*args, **kwargs):
        for image in (train / "images").iterdir():
            image.unlink()
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(finetune, "training_batches", delete_an_image_after_the_scan)
    with pytest.raises(ToolError, match=r"the training data changed since it was scanned \(image .*img\d\d\.png "
                                        r"was deleted or replaced after the scan.*\); no checkpoint was saved"):
        finetune.main(["--model", str(data["base"]), "--train-data", str(train), "--output-dir",
                       str(tmp_path / "out"), "--max-steps", "2", *FAST])


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_no_partial_checkpoint(data, tmp_path,
                                                                                          monkeypatch):
    """The second checkpoint save fails as torch.save fails on a full disk (a RuntimeError that does not say so, a
    part of the file written): one line naming the disk and the checkpoint to resume from, no step-2 folder and no
    build folder left."""
    from accelerate import Accelerator

    real_save_state, saves = Accelerator.save_state, []

    def save_state_on_a_full_disk(self, output_dir=None, **kwargs):
        saves.append(output_dir)
        if len(saves) < 2:
            return real_save_state(self, output_dir, **kwargs)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
        monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096,) * 2 + (0,) * 8))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(Accelerator, "save_state", save_state_on_a_full_disk)
    out = tmp_path / "out"
    with pytest.raises(ToolError) as raised:
        run(data, out, "--max-steps", 3, "--save-every", 1)
    message = str(raised.value)
    assert "\n" not in message
    assert re.fullmatch(rf"writing {re.escape(str(out / 'checkpoints' / 'step-00000002'))} failed: no space left on "
                        r"the device \(RuntimeError: .*unexpected pos 576 vs 534\); nothing was left half-written; "
                        rf"the last checkpoint is {re.escape(str(out / 'checkpoints' / 'step-00000001'))}: run the "
                        "same command with --resume to continue from it", message), message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_second_evaluate_into_the_same_output_dir_is_refused(data, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model", str(data["base"]), "--data", str(data["val"]), "--output-dir", str(out), "--num-workers", "0"]
    real_evaluate, second = evaluate.evaluate, []

    def second_run_meanwhile(*args, **kwargs):
        try:
            evaluate.main(argv)
        except ToolError as error:
            second.append(str(error))
        return real_evaluate(*args, **kwargs)

    evaluate.evaluate = second_run_meanwhile
    try:
        summary = evaluate.main(argv)
    finally:
        evaluate.evaluate = real_evaluate
    assert second == [f"another evaluate.py run is writing {out}: choose another --output-dir"]
    assert json.loads((out / "metrics.json").read_text())["objects"] == summary["objects"] == 4
    assert len(list((out / "masks").rglob("*.png"))) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no lock or partial folder left


RESOLUTION_CASES = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT / "tests")!r})
from accelerate.state import AcceleratorState
from sam_split import evaluate, finetune
from sam_split.tools.cli import ToolError

def outcome(main, argv):
    AcceleratorState._reset_state(reset_partial_state=True)
    started = time.perf_counter()
    try:
        main(argv)
        message = "no error"
    except ToolError as error:
        message = str(error)
    return {{"message": message, "seconds": time.perf_counter() - started}}
"""


@pytest.mark.slow
def test_hub_names_typos_revisions_and_an_unreachable_hub_are_one_line(data, tmp_path):
    """A model name that is no folder and no Hub repository, a revision the repository lacks, an adapter given as
    the model, and a Hub that cannot be reached: each one line, at once (no retries)."""
    out, evaluate_args = str(tmp_path / "out"), ["--data", str(data["val"]), "--num-workers", "0"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tester/sam-base"}))
    cases = RESOLUTION_CASES + f"""
from huggingface_hub import HfApi
api = HfApi()
for repo, folder in (("tester/sam-base", {str(data["base"])!r}), ("tester/adapter", {str(adapter)!r})):
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=folder)
ft = ["--train-data", {str(data["train"])!r}, "--output-dir", {out!r}, "--max-steps", "1"]
ev = [*{evaluate_args!r}, "--output-dir", {out!r}]
results = {{
    "typo": outcome(evaluate.main, ["--model", "tester/sam-bsae", *ev]),
    "base-revision": outcome(finetune.main, ["--model", "tester/sam-base", "--base-revision", "v9", *ft]),
    "adapter-revision": outcome(evaluate.main, ["--adapter", "tester/adapter", "--adapter-revision", "v9", *ev]),
    "adapter-as-model": outcome(finetune.main, ["--model", "tester/adapter", *ft]),
}}
print("RESULTS", json.dumps(results))
"""
    with HubServer(tmp_path / "hub", token="secret") as hub:
        printed = run_python(cases, hub_env(hub.url, tmp_path / "hf", token="secret"), replace_env=True)
    results = json.loads(printed.split("RESULTS ", 1)[1])
    assert results["typo"]["message"].startswith("--model tester/sam-bsae: no such folder, and not found on the Hub")
    assert results["base-revision"]["message"].startswith("--base-revision v9: no such branch, tag or commit in "
                                                          "tester/sam-base")
    assert results["adapter-revision"]["message"].startswith("--adapter-revision v9: no such branch, tag or commit "
                                                             "in tester/adapter")
    assert "--model tester/adapter is a PEFT adapter, not a model" in results["adapter-as-model"]["message"]

    unreachable = RESOLUTION_CASES + f"""
print("RESULTS", json.dumps(outcome(evaluate.main, ["--model", "sam-vit-base-splt", *{evaluate_args!r},
                                                     "--output-dir", {out!r}])))
"""
    printed = run_python(unreachable, hub_env(f"http://127.0.0.1:{free_port()}", tmp_path / "hf"), replace_env=True)
    result = json.loads(printed.split("RESULTS ", 1)[1])
    assert result["message"].startswith("--model sam-vit-base-splt: no such folder, and the Hub at http://127.0.0.1:")
    assert "cannot be reached" in result["message"] and result["seconds"] < 10
    assert not Path(out).exists()


def test_offline_a_hub_id_needs_a_sha_and_the_cache(monkeypatch, tmp_path):
    from sam_split.tools import models

    monkeypatch.setattr(models.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ToolError, match="HF_HUB_OFFLINE is set: a Hub id loads from the cache only when "
                                        "--base-revision is a commit sha"):
        models.resolve_model("org/sam", "main")
    with pytest.raises(ToolError, match="the download cache does not hold it"):
        models.resolve_model("org/sam", "0" * 40)


def test_evaluate_leaves_a_partial_folder_it_did_not_create(data, tmp_path):
    """evaluate.py used to delete `OUT.partial` before writing: a folder of the user's that it did not create."""
    users = tmp_path / "eval.partial"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    evaluate.main(["--model", str(data["base"]), "--data", str(data["val"]), "--output-dir", str(tmp_path / "eval"),
                   "--num-workers", "0"])
    assert (users / "notes.txt").read_text() == "mine"
    assert (tmp_path / "eval" / "metrics.json").is_file()
