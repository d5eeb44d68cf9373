"""finetune.py on a tiny SAM (64x64 images) and synthetic shapes: it learns, trains only what it should, resumes
exactly, survives bad data, runs as 2 DDP processes, and publishes an adapter that reloads pinned to revisions."""

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
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import SamModel

from hub_server import HubServer
from sam_split import SamSplitModel, finetune
from sam_testing import hub_env, max_abs_diff, random_stock_sam, run_python, sample_inputs, tiny_sam_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free loopback port for the DDP rendezvous: accelerate's fixed default (29500) can hang on a port still held
    by another job."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

# Shared by the runs below: in-process, no DataLoader workers (their start-up costs more than these tiny steps).
FAST = ["--num-workers", "0", "--batch-size", "4"]


def write_shapes(root: Path, count: int, seed: int, size: int = 64) -> Path:
    """`count` noisy grey images, each with one bright disc or rectangle, and its 0/255 mask as `<name>_0.png`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, cols = np.mgrid[:size, :size]
    for i in range(count):
        image = rng.normal(60, 25, (size, size, 3))
        center_row, center_col = rng.integers(16, size - 16, 2)
        radius = int(rng.integers(6, 14))
        if i % 2:
            mask = (rows - center_row) ** 2 + (cols - center_col) ** 2 <= radius**2
        else:
            mask = (abs(rows - center_row) <= radius) & (abs(cols - center_col) <= radius * 0.7)
        image[mask] += 130
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"img{i:02d}_0.png")
    return root


def trainable_random_sam() -> SamSplitModel:
    """Random weights a few dozen steps can learn from: `random_stock_sam`, but layer norms at identity and point
    frequencies of order 1 (N(0, 0.05) ones make every prompt look alike)."""
    sam = random_stock_sam(tiny_sam_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in sam.modules():
            if "LayerNorm" in type(module).__name__:
                module.weight.fill_(1.0)
                module.bias.zero_()
        embedding = sam.shared_image_embedding.positional_embedding
        embedding.copy_(torch.randn(embedding.shape, generator=generator))
    return SamSplitModel.from_sam(sam)


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
    model = run(data, out, "--val-data", data["val"], "--train-decoder", "--lr", "1e-2", "--max-steps", 40,
                "--eval-every", 20, "--merge-to-sam", data["root"] / "merged")
    return model, out


@pytest.fixture(scope="module")
def lora_run(data):
    """3 steps of LoRA alone, with dropout, box + point prompts and gradient accumulation."""
    AcceleratorState._reset_state(reset_partial_state=True)
    out = data["root"] / "lora-run"
    model = run(data, out, "--lr", "1e-2", "--max-steps", 3, "--prompt", "box+point", "--num-points", 2,
                "--gradient-accumulation-steps", 2)
    return model, out


def test_loss_falls_and_validation_iou_rises(decoder_run):
    _, out = decoder_run
    losses = [entry["loss"] for entry in metrics(out) if "loss" in entry]
    ious = {entry["step"]: entry["val_iou"] for entry in metrics(out) if "val_iou" in entry}
    assert sorted(ious) == [0, 20, 40]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert ious[40] > ious[0] + 0.2, ious


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


def test_lora_run_changes_only_lora_weights(data, lora_run):
    model, out = lora_run
    changed = changed_parameters(model, SamSplitModel.from_pretrained(data["base"]))
    assert {name for name, moved in changed.items() if moved} == {n for n in changed if "lora_" in n}
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in name for name in saved)
    assert json.loads((out / "adapter_config.json").read_text())["revision"] is None  # local base: no revision


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
    with pytest.raises(SystemExit, match="differ from the checkpoint.*lora_r"):
        run(data, tmp_path / "resumed", *args, "--resume", "--lora-r", 4, "--max-steps", 9)


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
    assert "skipped 7 (" in printed and f"{bad} (folder: 7 images): 3 objects" in printed
    for reason in ("image without masks", "empty mask", "mask is 32x32, image is 64x64", "unreadable image",
                   "mask is not binary", "unreadable mask", "mask without an image"):
        assert reason in printed, reason
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match="7 bad samples"):
        run(data, tmp_path / "strict", "--max-steps", 1, "--strict-data", "--val-data", bad)
    assert not (tmp_path / "strict" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "layout, message",
    [("missing", "does not exist"), ("no-masks-folder", "neither a `datasets` folder nor has masks/"),
     ("all-bad", "no usable"), ("dataset-column", "no column")],
)
def test_unusable_data_fails_before_training(data, tmp_path, layout, message):
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
    with pytest.raises(SystemExit, match=message):
        finetune.main(["--model", str(data["base"]), "--train-data", str(path), "--output-dir",
                       str(tmp_path / "out"), "--max-steps", "1", *FAST])
    assert not (tmp_path / "out" / "adapter_config.json").exists()


def test_saved_dataset_gives_the_same_samples_as_the_folder(data, tmp_path):
    import datasets

    names = sorted(p.stem for p in (data["train"] / "images").iterdir())
    rows = {"image": [str(data["train"] / "images" / f"{n}.png") for n in names],
            "mask": [[str(data["train"] / "masks" / f"{n}_0.png")] for n in names]}
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Sequence(datasets.Image())})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))

    config = SamSplitModel.from_pretrained(data["base"]).config
    processor, grid = finetune.sam_processor(config), finetune.mask_grid_size(config)
    args = finetune.parse_args(["--model", "m", "--train-data", "x", "--output-dir", str(tmp_path / "o"),
                                "--max-steps", "1"])

    def prompted(path):
        source = finetune.open_source(str(path), "train", args)
        samples = finetune.scan(source, grid, strict=True, log=print)
        return finetune.PromptedSegmentation(source, samples, processor, grid, "box+point", 2, 0.1, seed=0)

    from_folder, from_dataset = prompted(data["train"]), prompted(tmp_path / "saved")
    assert len(from_folder) == len(from_dataset) == 12
    for key in [(-1, 0), (3, 5), (0, 11)]:
        expected, got = from_folder[key], from_dataset[key]
        assert expected.keys() == got.keys() and expected["labels"].sum() > 0
        for name in expected:
            assert torch.equal(expected[name], got[name]), (key, name)
    run(data, tmp_path / "out", "--max-steps", 1, "--val-data", tmp_path / "saved", "--val-split", "train")
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_two_ddp_processes_end_with_identical_weights(data, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "finetune.py"),
               "--cpu", "--model", str(data["base"]), "--train-data", str(data["train"]), "--val-data",
               str(data["val"]), "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--train-decoder",
               "--lr", "1e-2", *FAST]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    digests = re.search(r"trainable weights sha256 per process: \[(.*)\]", result.stdout).group(1).split(", ")
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "2 process(es) x batch 4" in result.stdout
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] == ["mask_decoder"]


def test_push_to_hub_and_reload_pinned(data, tmp_path):
    token = "finetune-secret"
    with HubServer(tmp_path / "hub", token=token) as hub:
        env = hub_env(hub.url, tmp_path / "hf", token=token)
        outputs = tmp_path / "trained.pt"
        train = f"""
import sys, torch
from huggingface_hub import HfApi
sys.path.insert(0, {str(ROOT / "tests")!r})
from sam_split import finetune
from sam_testing import sample_inputs
api = HfApi()
api.create_repo("tester/sam-base")
base_sha = api.upload_folder(repo_id="tester/sam-base", folder_path={str(data["base"])!r}).oid
model = finetune.main(["--model", "tester/sam-base", "--revision", base_sha, "--train-data", {str(data["train"])!r},
                       "--output-dir", {str(tmp_path / "out")!r}, "--max-steps", "2", "--train-decoder",
                       "--lr", "1e-2", "--push-to", "tester/sam-adapter", *{FAST!r}])
with torch.no_grad():
    logits = model.eval()(**sample_inputs(model.config), multimask_output=False).pred_masks
torch.save(logits, {str(outputs)!r})
print("BASE", base_sha)
"""
        printed = run_python(train, env, replace_env=True)
        base_sha = re.search(r"BASE ([0-9a-f]+)", printed).group(1)
        adapter_sha = re.search(r"pushed adapter to tester/sam-adapter at revision (\S+)", printed).group(1)
        assert re.fullmatch(r"[0-9a-f]{40}", adapter_sha) and adapter_sha != base_sha

        load = f"""
import json, sys, torch
from huggingface_hub import hf_hub_download
from peft import PeftModel
from transformers import AutoModel
sys.path.insert(0, {str(ROOT / "tests")!r})
from sam_testing import sample_inputs
config = json.load(open(hf_hub_download("tester/sam-adapter", "adapter_config.json", revision="{adapter_sha}")))
assert config["base_model_name_or_path"] == "tester/sam-base" and config["revision"] == "{base_sha}", config
base = AutoModel.from_pretrained("tester/sam-base", trust_remote_code=True, revision="{base_sha}")
model = PeftModel.from_pretrained(base, "tester/sam-adapter", revision="{adapter_sha}").eval()
with torch.no_grad():
    logits = model(**sample_inputs(model.config), multimask_output=False).pred_masks
print("DIFF", (logits - torch.load({str(outputs)!r})).abs().max().item())
"""
        # A fresh cache: everything comes from the server at the pinned revisions.
        printed = run_python(load, {**env, "HF_HOME": str(tmp_path / "hf-fresh")}, replace_env=True)
    assert float(re.search(r"DIFF (\S+)", printed).group(1)) < 1e-5
