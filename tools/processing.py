"""Per-family processing for training and scoring (SAM, SAM-HQ, SAM 2, SAM 3 tracker; stock or split-q/k/v twin;
PEFT-wrapped or not): which family a model is, loading it strictly, its processor, its low-resolution mask grid, the
low-res target of a mask and the decoding arguments.

The mask geometry lives here once: `mask_grid_size` (4x the image-embedding grid, the side of `pred_masks`) sets the
processor's mask settings, and `low_res_target` reads them back, so a target lines up with `pred_masks` by
construction (tested against the processor's own `segmentation_maps` preprocessing and against `pred_masks`).

Per family: SAM and SAM-HQ (`SamProcessor` / `SamHQProcessor`, SAM's image processor) resize the longest side and
pad bottom/right, images and masks alike; SAM 2 (`Sam2Processor`) resizes the whole image to a square, no padding,
and so does the SAM 3 tracker (`Sam3TrackerProcessor`: SAM 2's code, another normalisation). Their image processors
need torchvision; without it the processor a SAM 2 twin's repository ships stands in
(`processing_sam2_split.Sam2SplitImageProcessor`).
"""

import numpy as np
import transformers
from PIL import Image

from .cli import ToolError
from .compat import sam2_image_processor, sam3_tracker_processor, sam_image_processor_class
from .family import allow_checkpointing_, mask_grid_size, member_for_config

# SAM-HQ's authors' advice for prompts that pick one object (SysCV/sam-hq demo/demo_hqsam.py: "For images contain
# single object, we suggest to set hq_token_only = True"); their training loss is on the HQ mask alone, too.
HQ_TOKEN_ONLY_DEFAULT = True


def model_family(model_or_config) -> str:
    """"sam", "sam_hq", "sam2" or "sam3_tracker" (the member's stock `model_type`) for a model (stock or twin, PEFT-
    or DDP-wrapped) or its config, as `tools.family` knows the members."""
    config = getattr(model_or_config, "config", None) or getattr(getattr(model_or_config, "module", None), "config",
                                                                   model_or_config)
    model_type = str(getattr(config, "model_type", ""))
    if model_type == "sam2_video":
        raise ToolError("a SAM 2 video model: the tools train the image model; convert the checkpoint with push.py "
                        "--image-only (it builds the SAM 2 image twin)")
    if model_type == "sam2_video_split":
        raise ToolError("a SAM 2 video twin (the tracker): the tools train and score the image model; build it with "
                        "push.py --image-only from the stock checkpoint (an adapter trained on it runs in the tracker)")
    try:
        return member_for_config(config).stock_types[0]
    except ValueError:
        raise ToolError(f"not a SAM, SAM-HQ, SAM 2 or SAM 3 tracker model (model_type {model_type!r})") from None


def load_model(name: str, revision: str | None = None):
    """The model at `name` (folder or Hub id) at `revision`, as the class its config names: `AutoModel` with
    `trust_remote_code=True`, as `AutoPeftModel` loads an adapter's base. Strict: a missing, unexpected or
    mis-shaped weight is an error (transformers would only warn). A member trained as its stock model (the SAM 3
    tracker) comes with gradient checkpointing allowed (`family.allow_checkpointing_`)."""
    try:
        model, info = transformers.AutoModel.from_pretrained(name, revision=revision, trust_remote_code=True,
                                                             output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ToolError(f"cannot load the model {name}: {str(error).splitlines()[0]}") from None
    problems = {kind: sorted(map(str, info.get(kind) or ())) for kind in ("missing_keys", "unexpected_keys",
                                                                          "mismatched_keys")}
    if any(problems.values()):
        found = "; ".join(f"{kind.replace('_', ' ')} {keys[:6]}" for kind, keys in problems.items() if keys)
        raise ToolError(f"{name} does not match its model class {type(model).__name__}: {found}")
    model_family(model)
    if member_for_config(model.config).twin is None:
        allow_checkpointing_(model)
    return model


def model_processor(config):
    """The processor for a model of any family, with its standard preprocessing and the mask settings of its mask
    grid. SAM 2's and the SAM 3 tracker's own image processors need torchvision (5.23 and 4.57 alike); without it, a
    PIL stand-in with the same geometry (`processing_sam2_split.Sam2SplitImageProcessor`, what the SAM 2 twin's
    repository ships)."""
    family, grid = model_family(config), mask_grid_size(config)
    # SAM 2 and the tracker: the vision config gives the size per axis, in the backbone config; the prompt encoder's
    if family == "sam2":
        return sam2_image_processor(config.prompt_encoder_config.image_size, grid)
    if family == "sam3_tracker":
        return sam3_tracker_processor(config.prompt_encoder_config.image_size, grid)
    size = config.vision_config.image_size
    image_processor = sam_image_processor_class()(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": grid}, mask_pad_size={"height": grid, "width": grid},
    )
    processor_class = transformers.SamHQProcessor if family == "sam_hq" else transformers.SamProcessor
    return processor_class(image_processor=image_processor)


def mask_grid(processor) -> int:
    """The processor's mask grid side (its `mask_pad_size`, or SAM 2's `mask_size`)."""
    image_processor = processor.image_processor
    return int((getattr(image_processor, "mask_pad_size", None) or image_processor.mask_size)["height"])


def low_res_target(mask: np.ndarray, processor) -> np.ndarray:
    """A bool (height, width) mask at the processor's mask grid, as float32 {0, 1}: what its `segmentation_maps`
    preprocessing makes of it (nearest-neighbour resize; SAM: longest side to the grid, then zero padding bottom/right
    like the image; SAM 2: the whole image to the square grid), so it lines up with `pred_masks`."""
    height, width = mask.shape
    settings = processor.image_processor
    padded = getattr(settings, "mask_pad_size", None)
    grid = mask_grid(processor)
    if padded:  # SAM, SAM-HQ: SamImageProcessor._get_preprocess_shape
        scale = settings.mask_size["longest_edge"] * 1.0 / max(height, width)
        new_size = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        new_size = (settings.mask_size["width"], settings.mask_size["height"])
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new_size, Image.NEAREST)) > 127
    target = np.zeros((grid, grid), dtype=np.float32)
    target[: resized.shape[0], : resized.shape[1]] = resized
    return target


def decode_options(model_or_config, hq_token_only: bool = HQ_TOKEN_ONLY_DEFAULT) -> dict:
    """Forward arguments for one mask per prompt: `multimask_output=False` for every family, and SAM-HQ's
    `hq_token_only`."""
    options = {"multimask_output": False}
    if model_family(model_or_config) == "sam_hq":
        options["hq_token_only"] = hq_token_only
    return options


def add_decoding_arguments(parser) -> None:
    """The family-specific decoding flags, shared by finetune.py and evaluate.py."""
    import argparse

    parser.add_argument("--hq-token-only", action=argparse.BooleanOptionalAction, default=HQ_TOKEN_ONLY_DEFAULT,
                        help="SAM-HQ: train and score the HQ token's mask alone (default, as SAM-HQ's authors advise "
                             "for one object per prompt); --no-hq-token-only: SAM's mask plus the HQ correction")
