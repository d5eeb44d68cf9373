"""Reload a saved model as a user would (a fresh process, an empty cache, remote code) and compare its outputs with a
reference model's.

Top-level imports are the standard library and torch only: this file also runs as a script, in the fresh process that
reloads a model (`reload_and_run`), where the package must not be imported (the reload has to prove that the
repository's own code loads).
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# Names of the outputs every family member has, in the order they are computed and reported.
OUTPUT_NAMES = ("image embeddings", "masks", "IoU scores")


def verification_inputs(config) -> dict:
    """A fixed image with a point and a box prompt, at the model's real input size (`config`: a SAM, SAM-HQ or SAM 2
    config; each has the image size in its prompt encoder's config)."""
    size = config.prompt_encoder_config.image_size
    return {
        "pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
        "input_points": torch.tensor([[[[0.3 * size, 0.6 * size]]]]),
        "input_labels": torch.tensor([[[1]]]),
        "input_boxes": torch.tensor([[[0.1 * size, 0.2 * size, 0.8 * size, 0.9 * size]]]),
    }


def sam_outputs(model, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs of a SAM-family model (stock or split) on `inputs` (pixel values plus prompts), in fp32 and without
    gradients: {image embeddings, masks, IoU scores}, plus SAM-HQ's "intermediate embeddings N" (the global layers'
    outputs its mask decoder reads) and SAM 2's "image embeddings N" (every feature level, N = 1, 2: "image
    embeddings" is the mask decoder's, the last) and "object scores".

    The family is told by the model's structure (this file must not import the package): SAM 2's vision encoder has a
    Hiera `backbone`, SAM-HQ's returns `intermediate_embeddings`. SAM and SAM-HQ call the vision encoder directly
    (`get_image_embeddings` would not do for a model under training) and the masks come from those very embeddings;
    SAM 2 runs its whole forward, which returns its embeddings. SAM 2 video (the tracker) is `tracking_outputs`'."""
    if hasattr(model, "memory_attention"):  # SAM 2 video
        return tracking_outputs(model, inputs)
    pixel_values = inputs["pixel_values"].to(model.dtype)
    prompts = {name: value for name, value in inputs.items() if name != "pixel_values"}
    with torch.no_grad():
        if hasattr(model.vision_encoder, "backbone"):  # SAM 2
            outputs = model(pixel_values=pixel_values, **prompts)
            *higher, embeddings = outputs.image_embeddings
            extra = {f"image embeddings {level}": tensor for level, tensor in enumerate(higher)}
            extra["object scores"] = outputs.object_score_logits
        else:
            encoded = model.vision_encoder(pixel_values)
            embeddings = encoded[0]
            intermediate = getattr(encoded, "intermediate_embeddings", None)  # SAM-HQ
            kwargs = {} if intermediate is None else {"intermediate_embeddings": intermediate}
            outputs = model(image_embeddings=embeddings, **prompts, **kwargs)
            extra = {f"intermediate embeddings {n}": tensor for n, tensor in enumerate(intermediate or ())}
    result = dict(zip(OUTPUT_NAMES, (embeddings, outputs.pred_masks, outputs.iou_scores)))
    return {name: tensor.float() for name, tensor in {**result, **extra}.items()}


VIDEO_FRAMES = 3


def tracking_outputs(model, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The outputs of a SAM 2 video model (stock `Sam2VideoModel` or the split twin) on `inputs`, in fp32: the vision
    encoder's feature levels of the image ("image embeddings", the mask decoder's, and "image embeddings N", N = 0,
    1), and a propagation through a clip of `VIDEO_FRAMES` frames (the image shifted right a little more each frame)
    of two objects, one prompted by `inputs`' point and one by its box on the first frame: "masks" and (transformers
    5) "object scores" of every frame, stacked. The inference session is built directly (transformers' video
    processor needs torchvision); the prompts are in the model's input pixels already."""
    from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

    pixel_values = inputs["pixel_values"].to(model.dtype)
    size = pixel_values.shape[-1]
    video = torch.cat([pixel_values.roll(frame * max(size // 32, 1), dims=-1) for frame in range(VIDEO_FRAMES)])
    session = Sam2VideoInferenceSession(video=video, video_height=size, video_width=size, dtype=model.dtype,
                                        inference_device=model.device, inference_state_device=model.device,
                                        video_storage_device=model.device)
    box = inputs["input_boxes"].reshape(1, 1, 2, 2)
    for obj_id, points, labels in ((1, inputs["input_points"], inputs["input_labels"].int()),
                                   (2, box, torch.tensor([[[2, 3]]], dtype=torch.int32))):  # 2, 3: a box's corners
        session.add_point_inputs(session.obj_id_to_idx(obj_id), 0, {"point_coords": points.float().to(model.device),
                                                                     "point_labels": labels.to(model.device)})
    session.obj_with_new_inputs = [1, 2]
    with torch.no_grad():
        levels = model.vision_encoder(pixel_values).fpn_hidden_states
        frames = list(model.propagate_in_video_iterator(session, start_frame_idx=0))
    *higher, embeddings = levels
    result = {"image embeddings": embeddings, **{f"image embeddings {n}": level for n, level in enumerate(higher)},
              "masks": torch.stack([frame.pred_masks for frame in frames])}
    if getattr(frames[0], "object_score_logits", None) is not None:  # transformers 5 outputs them, 4.57 does not
        result["object scores"] = torch.stack([frame.object_score_logits for frame in frames])
    return {name: tensor.float() for name, tensor in result.items()}


def max_differences(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """{output name: max abs difference}, for every output in `expected`; a shape mismatch is an infinite difference."""
    return {
        name: (actual[name] - expected[name]).abs().max().item() if actual[name].shape == expected[name].shape
        else float("inf")
        for name in expected
    }


@dataclass(frozen=True)
class Reloaded:
    outputs: dict  # {output name: tensor}, see `sam_outputs`
    model_class: str  # the class the Auto class built, e.g. "SamSplitModel"
    code_file: str  # the file that class came from (remote code: its copy in HF_HOME's modules cache)


def reload_and_run(models: Mapping[str, tuple[str, str | None]], inputs: Mapping[str, torch.Tensor], *,
                   env: Mapping[str, str] | None = None, auto_classes: tuple[str, ...] = ("AutoModel",),
                   progress: Callable[[str], None] | None = None) -> dict[str, Reloaded]:
    """Load each `{name: (folder or Hub id, revision)}` as a user would, with `<auto class>.from_pretrained(...,
    trust_remote_code=True)` in one fresh Python process, run it on `inputs` and return `{"name/AutoClass": Reloaded}`.

    `env`: the child's whole environment (default: this one with a private, empty HF_HOME and HF_HUB_OFFLINE=1, so the
    code comes from the folder itself and no cache can stand in for it). The child's progress lines go to `progress`
    as they come. A child that fails is a `ToolError` with the end of its stderr.
    """
    from .cli import ToolError  # here: run as a script, this file imports nothing of the package

    with tempfile.TemporaryDirectory(prefix="sam-split-reload-") as scratch:
        scratch = Path(scratch)
        torch.save(dict(inputs), scratch / "inputs.pt")
        if env is None:
            env = {**os.environ, "HF_HOME": str(scratch / "hf_home"), "HF_HUB_OFFLINE": "1"}
        request = {"parent": os.getpid(), "models": dict(models), "auto_classes": list(auto_classes),
                   "inputs": str(scratch / "inputs.pt"),
                   "results": str(scratch / "results.pt")}
        # stderr goes to a file: a child that writes much of it cannot then block on a full pipe
        with open(scratch / "stderr.txt", "w+") as stderr_file:
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), json.dumps(request)],
                                     env=dict(env), stdout=subprocess.PIPE, stderr=stderr_file, text=True)
            try:
                for line in child.stdout:
                    if progress is not None:
                        progress(line.rstrip())
                child.wait()
            finally:
                if child.poll() is None:  # interrupted (Ctrl-C, SIGTERM under `run_tool`): no orphan keeps running
                    child.kill()
                    child.wait()
            stderr_file.seek(0)
            stderr = stderr_file.read()
        if child.returncode != 0:
            raise ToolError(f"reloading {', '.join(f'{path}@{rev}' if rev else path for path, rev in models.values())}"
                            f" with {' and '.join(auto_classes)} failed:\n{stderr[-3000:]}")
        results = torch.load(scratch / "results.pt")
    return {key: Reloaded(**value) for key, value in results.items()}


def _die_with_parent(parent: int) -> None:
    """Make this process end when `parent` does, even by SIGKILL, which leaves it no chance to end its children:
    Linux's PR_SET_PDEATHSIG; elsewhere a thread that watches the parent id."""
    import ctypes
    import signal
    import threading

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:  # 1 = PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl failed")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _reload_child(request: dict) -> None:
    import transformers

    inputs = torch.load(request["inputs"])
    results = {}
    for name, (path, revision) in request["models"].items():
        for auto_class in request["auto_classes"]:
            started = time.monotonic()
            model = getattr(transformers, auto_class).from_pretrained(path, trust_remote_code=True, revision=revision)
            model = model.float().eval()
            print(f"reloaded {name} with {auto_class} ({type(model).__name__}) in {time.monotonic() - started:.1f} s; "
                  f"running it on {tuple(inputs['pixel_values'].shape)} pixel values", flush=True)
            started = time.monotonic()
            outputs = sam_outputs(model, inputs)
            print(f"ran {name} in {time.monotonic() - started:.1f} s", flush=True)
            results[f"{name}/{auto_class}"] = {"outputs": outputs, "model_class": type(model).__name__,
                                               "code_file": sys.modules[type(model).__module__].__file__}
    torch.save(results, request["results"])


if __name__ == "__main__":
    # Run as a script, Python put this file's folder (the repository root) first on sys.path: drop it, so that none of
    # the repository's files (compat.py, evaluate.py, ...) can stand in for a library of the same name.
    sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
    request = json.loads(sys.argv[1])
    _die_with_parent(request["parent"])
    _reload_child(request)
