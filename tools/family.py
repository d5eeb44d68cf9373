"""The SAM family as the tools see it: which twin converts which stock checkpoint, the `random:` names built from each
member's own size table, and each member's default processor configuration. Adding a member is adding a row here
(and its model files at the root), not a branch in every tool.

A member without a twin (the SAM 3 tracker, transformers 5 only: its ViT has separate `q_proj`/`k_proj`/`v_proj`
already) is trained as its stock model; its row names that model and the LoRA targets that reach its vision backbone
alone.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from .. import Sam2SplitModel, Sam2VideoSplitModel, SamHQSplitModel, SamSplitModel
from ..configuration_sam2_split import SAM2_SIZES, SAM2_TINY
from ..configuration_sam2_video_split import SAM2_VIDEO_TINY
from ..configuration_sam_hq_split import SAM_HQ_SIZES, SAM_HQ_TINY
from ..configuration_sam_split import SAM_SIZES, SAM_TINY
from ..processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitProcessor, Sam2SplitVideoProcessor
from .cli import RANDOM_PREFIX
from .compat import (
    sam2_preprocessor_config,
    sam3_tracker_class,
    sam3_tracker_preprocessor_config,
    sam_hq_preprocessor_config,
    sam_preprocessor_config,
)


@dataclass(frozen=True)
class Member:
    """One family member: its stock `model_type`s, its split twin, its `random:` sizes and its default processor.

    `twin`: the split-q/k/v twin the tools train, or None for a member whose stock model has separate q/k/v already
    (`stock`: that model's class, trained as it is); `sizes`: {random name (after `random:`): stock config arguments};
    `processor_config`: a config of the member -> `preprocessor_config.json` contents that `AutoProcessor` loads;
    `describe`: a config -> its sizes in words; `card_tags`, `doc_url`, `post_process`: the model card's tags, link
    and mask post-processing call; `processors`: the processor classes the repository ships (a root
    `processing_*.py`) for `AutoProcessor` and `AutoImageProcessor` where transformers' own need torchvision (SAM 2),
    named in its processor configs' `auto_map`; `usage`: the model card's usage code where it is not an image model's
    (`$repo_id` in it is the repository); `image_stock_type`: for a video member, the stock `model_type` of the image
    model it holds, whose member `push.py --image-only` builds instead; `lora_targets`: finetune.py's default
    `target_modules` (names, or one regular expression that PEFT matches against whole module names); `square`:
    images are resized to a square, not padded (SAM 2's processor and its descendants)."""

    name: str
    stock_types: tuple[str, ...]
    twin: type | None
    sizes: dict[str, dict]
    processor_config: Callable[[object], dict]
    describe: Callable[[object], str]
    card_tags: tuple[str, ...]
    doc_url: str
    post_process: str
    processors: dict[str, type] | None = None
    usage: str | None = None
    image_stock_type: str | None = None
    stock: type | None = None
    lora_targets: tuple[str, ...] | str = ("q", "v")
    square: bool = False

    @property
    def processor_auto_map(self) -> dict[str, str] | None:
        """The `auto_map` of the shipped processors: {"AutoProcessor": "processing_sam2_split.Sam2SplitProcessor",
        ...}."""
        return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
                for auto, cls in self.processors.items()} if self.processors else None

    @property
    def stock_class(self) -> type:
        return self.twin.stock_class if self.twin is not None else self.stock

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every `model_type` of the member: its stock ones and its twin's."""
        return (*self.stock_types, *((self.twin.config_class.model_type,) if self.twin is not None else ()))

    def stock_config(self, size: str):
        config_class = self.twin.stock_config_class if self.twin is not None else self.stock.config_class
        return config_class(**self.sizes[size])


def _image_size(config) -> int:
    return config.prompt_encoder_config.image_size


def mask_grid_size(config) -> int:
    """Side of the low-res masks (`pred_masks`) of every member: 4x the image-embedding grid, i.e. the prompt
    encoder's `mask_input_size` (256 at image size 1024 with 16-px patches; 288 at 1008 with 14-px ones)."""
    prompt = config.prompt_encoder_config
    return 4 * (prompt.image_size // prompt.patch_size)


def _describe_vit(config) -> str:
    vision = config.vision_config
    return (f"hidden size {vision.hidden_size}, {vision.num_hidden_layers} layers, {vision.num_attention_heads} heads, "
            f"global attention in layers {list(vision.global_attn_indexes)}")


def _describe_sam3_vit(config) -> str:
    vit = config.vision_config.backbone_config
    return (f"ViT hidden size {vit.hidden_size}, {vit.num_hidden_layers} layers, {vit.num_attention_heads} heads, "
            f"global attention in layers {list(vit.global_attn_indexes)}")


def _describe_hiera(config) -> str:
    hiera = config.vision_config.backbone_config
    return (f"Hiera widths {list(hiera.embed_dim_per_stage)}, blocks per stage {list(hiera.blocks_per_stage)}, "
            f"global attention in blocks {list(hiera.global_attention_blocks)}")


# The SAM 3 tracker's `random:` sizes (stock `Sam3TrackerConfig` arguments): the released one (facebook/sam3's
# tracker: a 32-layer, 1024-wide ViT on 1008x1008 images, 458 M parameters), a small one for a CPU try (224x224
# images, 4 layers 128 wide) and a tiny one for the tests (112x112 images, 2 layers 32 wide, every layer kind).
SAM3_TRACKER_SIZES = {
    "sam3-tracker": {},
    "sam3-tracker-small": dict(
        vision_config=dict(backbone_config=dict(
            model_type="sam3_vit_model", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, global_attn_indexes=[1, 3], image_size=224, patch_size=14, window_size=8,
            pretrain_image_size=224), fpn_hidden_size=128, backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]]),
        prompt_encoder_config=dict(hidden_size=128, image_size=224, patch_size=14),
        mask_decoder_config=dict(hidden_size=128, num_attention_heads=4, mlp_dim=512, iou_head_hidden_dim=128),
    ),
    "sam3-tracker-tiny": dict(
        vision_config=dict(backbone_config=dict(
            model_type="sam3_vit_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, global_attn_indexes=[1], image_size=112, patch_size=14, window_size=4,
            pretrain_image_size=112), fpn_hidden_size=32, backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]]),
        prompt_encoder_config=dict(hidden_size=32, image_size=112, patch_size=14),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
    ),
}

_SAM_POST_PROCESS = ('processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], '
                     'inputs["reshaped_input_sizes"])')
_DOCS = "https://huggingface.co/docs/transformers/model_doc/"
# The tracker's model card usage: transformers' own (model_doc/sam2_video), with the repository's processor, which needs
# no torchvision (`processing_sam2_split.Sam2SplitVideoProcessor`).
_TRACKING_USAGE = """\
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("$repo_id", trust_remote_code=True, revision="<commit sha>")
processor = AutoProcessor.from_pretrained("$repo_id", trust_remote_code=True, revision="<commit sha>")
session = processor.init_video_session(video=frames)  # a list of PIL images or HxWx3 arrays
processor.add_inputs_to_inference_session(session, frame_idx=0, obj_ids=1, input_points=[[[[210, 350]]]],
                                          input_labels=[[[1]]])
model(inference_session=session, frame_idx=0)  # the prompted frame, then the others
for output in model.propagate_in_video_iterator(session):
    masks = $post_process[0]

# An adapter trained on images with the image twin (LoRA on q and v) tracks too: same module names.
from peft import PeftModel
tracker = PeftModel.from_pretrained(model, "<adapter folder or Hub id>").merge_and_unload()"""


MEMBERS = (
    Member(
        "SAM", ("sam",), SamSplitModel,
        # `vit-*` without the family prefix: the names README and scripts have used since the first release
        {**{size: dict(vision_config=sizes) for size, sizes in SAM_SIZES.items()},
         **{f"sam-{size}": dict(vision_config=sizes) for size, sizes in SAM_SIZES.items()}, "sam-tiny": SAM_TINY},
        lambda config: sam_preprocessor_config(_image_size(config)), _describe_vit, ("sam", "segment-anything"),
        _DOCS + "sam", _SAM_POST_PROCESS,
    ),
    Member(
        "SAM-HQ", ("sam_hq",), SamHQSplitModel,
        {**{f"sam-hq-{size}": sizes for size, sizes in SAM_HQ_SIZES.items()}, "sam-hq-tiny": SAM_HQ_TINY},
        lambda config: sam_hq_preprocessor_config(_image_size(config)), _describe_vit, ("sam-hq", "segment-anything"),
        _DOCS + "sam_hq", _SAM_POST_PROCESS,
    ),
    Member(
        "SAM 2.1", ("sam2",), Sam2SplitModel,
        {**{f"sam2.1-{size}": sizes for size, sizes in SAM2_SIZES.items()}, "sam2.1-tiny": SAM2_TINY},
        lambda config: sam2_preprocessor_config(_image_size(config)), _describe_hiera, ("sam2", "segment-anything"),
        _DOCS + "sam2", 'processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])',
        {"AutoProcessor": Sam2SplitProcessor, "AutoImageProcessor": Sam2SplitImageProcessor}, square=True,
    ),
    # facebook/sam2.1-hiera-* are video checkpoints: push.py builds this twin from them, the image twin on request.
    Member(
        "SAM 2.1 video", ("sam2_video",), Sam2VideoSplitModel,
        {**{f"sam2.1-video-{size}": sizes for size, sizes in SAM2_SIZES.items()}, "sam2.1-video-tiny": SAM2_VIDEO_TINY},
        lambda config: sam2_preprocessor_config(_image_size(config)), _describe_hiera,
        ("sam2", "sam2-video", "segment-anything", "video"), _DOCS + "sam2_video",
        "processor.post_process_masks([output.pred_masks], [[session.video_height, session.video_width]])",
        {"AutoProcessor": Sam2SplitVideoProcessor, "AutoImageProcessor": Sam2SplitImageProcessor},
        usage=_TRACKING_USAGE, image_stock_type="sam2", square=True,
    ),
)
if sam3_tracker_class() is not None:  # transformers 5
    MEMBERS += (Member(
        "SAM 3 tracker", ("sam3_tracker",), None, SAM3_TRACKER_SIZES,
        lambda config: sam3_tracker_preprocessor_config(_image_size(config), mask_grid_size(config)),
        _describe_sam3_vit,
        ("sam3", "segment-anything"), _DOCS + "sam3_tracker",
        'processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"])',
        stock=sam3_tracker_class(), square=True,
        # exactly the ViT backbone's q and v: plain "q_proj"/"v_proj" also hit the mask decoder
        lora_targets=r".*vision_encoder\.backbone\.layers\.\d+\.attention\.(q|v)_proj",
    ),)


def random_names() -> list[str]:
    """Every `random:` source name, in table order."""
    return [RANDOM_PREFIX + size for member in MEMBERS for size in member.sizes]


def member_for_random(size: str) -> Member:
    """The member whose size table has `size` (the name after `random:`); a `ValueError` lists the names."""
    for member in MEMBERS:
        if size in member.sizes:
            return member
    raise ValueError(f"expected one of {', '.join(random_names())}, got {RANDOM_PREFIX + size!r}")


def member_for_model_type(model_type: str | None) -> Member:
    """The member that converts stock checkpoints of `model_type`; a `ValueError` names what is accepted."""
    for member in MEMBERS:
        if model_type in member.stock_types:
            return member
    twins = {member.twin.config_class.model_type: member.twin.__name__ for member in MEMBERS if member.twin}
    hint = f" (already split: load it with {twins[model_type]}.from_pretrained)" if model_type in twins else ""
    accepted = ", ".join(repr(stock_type) for member in MEMBERS for stock_type in member.stock_types)
    raise ValueError(f"not a stock SAM checkpoint (model_type={model_type!r}, expected one of the SAM family: "
                     f"{accepted}){hint}")


def image_member(member: Member) -> Member:
    """The member whose twin is the image model a video `member` holds (`push.py --image-only`); a `ValueError` for
    a member that is an image model already."""
    if member.image_stock_type is None:
        raise ValueError(f"{member.name} is an image model already (--image-only is for SAM 2 video checkpoints)")
    return member_for_model_type(member.image_stock_type)


def member_for_config(config) -> Member:
    """The member of a config, stock or split (e.g. `SamConfig` or `Sam2SplitConfig`)."""
    for member in MEMBERS:
        if config.model_type in member.model_types:
            return member
    raise ValueError(f"model_type {config.model_type!r} is not one of the SAM family")


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Overwrite every floating-point weight and buffer of `model` with N(0, std), in place: transformers 5 initialises
    some weights (rel-pos tables, positional embeddings) to zero, and a comparison on near-zero weights proves nothing.
    Buffers that are no part of the state dict (SAM 2 video's rotary frequencies) are left as they are: they are
    computed from the config, so a saved and reloaded model recomputes them. The one re-randomiser: `random:` sources,
    the tests and the benchmarks use it."""
    generator = torch.Generator().manual_seed(seed)
    computed = {id(buffer) for module in model.modules() for name, buffer in module.named_buffers(recurse=False)
                if name in module._non_persistent_buffers_set}
    with torch.no_grad():
        for tensor in list(model.parameters()) + [buffer for buffer in model.buffers() if id(buffer) not in computed]:
            # (a tied weight once)
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std)
    return model


def trainable_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """After `randomize_`, make random weights that a few dozen steps can train, in place: layer norms at identity and
    the prompt encoders' random Fourier frequencies (`positional_embedding`) N(0, 1), as the models initialise them.
    With N(0, 0.05) norms and frequencies every prompt looks alike and fine-tuning moves nothing (Dice in the 6th
    digit over 40 steps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "LayerNorm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            frequencies = getattr(module, "positional_embedding", None)
            if torch.is_tensor(frequencies) and frequencies.dim() == 2 and frequencies.shape[0] == 2:
                frequencies.copy_(torch.randn(frequencies.shape, generator=generator))
    return model


def random_stock_model(size: str):
    """`(member, stock model)` of a `random:` size: N(0, 0.05) weights (see `randomize_`), layer norms at identity
    and prompt frequencies N(0, 1) (`trainable_`), so fine-tuning it visibly learns."""
    member = member_for_random(size)
    torch.manual_seed(0)
    return member, trainable_(randomize_(member.stock_class(member.stock_config(size)))).eval()


def allow_checkpointing_(model) -> None:
    """Let a stock member's model (the SAM 3 tracker) run with gradient checkpointing, in place: its ViT layers and
    mask decoder blocks are transformers' checkpointing layers, but the class says it supports none
    (`supports_gradient_checkpointing` False), so `activation_checkpointing_enable` refuses. Set on the instance,
    not in a subclass: transformers renames a Sam3Tracker checkpoint's weights (`tracker_model.`,
    `detector_model.`) for its own classes only, and would take a subclass for custom code. The gradients equal
    those without checkpointing (tests/test_sam3_tracker.py)."""
    model.supports_gradient_checkpointing = True


def checkpoint_model_type(name_or_path, revision: str | None = None) -> str | None:
    """The `model_type` in a checkpoint's config.json (a folder or a Hub id); a `ValueError` when the config's sizes
    are another member's (`check_config_body`)."""
    kwargs = {"revision": revision} if revision else {}
    config_dict, _ = transformers.PretrainedConfig.get_config_dict(str(name_or_path), **kwargs)
    check_config_body(config_dict)
    return config_dict.get("model_type")


# A field that only one member's config has (part, field, the field's own model_type where that tells members apart,
# else None), and the stock model_types that have it: SAM 2 (its image and its video model alike) and the SAM 3
# tracker both nest a `backbone_config`.
_OWN_FIELDS = (("vision_config", "backbone_config", "sam3_vit_model", ("sam3_tracker",)),
               ("vision_config", "backbone_config", None, ("sam2", "sam2_video")),
               ("mask_decoder_config", "vit_dim", None, ("sam_hq",)),
               ("vision_config", "global_attn_indexes", None, ("sam",)))


def _held_member(config_dict: dict) -> tuple[str, ...] | None:
    """The stock model_types whose own field `config_dict` holds (`_OWN_FIELDS`), or None."""
    for part, field, kind, stocks in _OWN_FIELDS:
        value = (config_dict.get(part) or {}).get(field)
        if value is not None and (kind is None or (isinstance(value, dict) and value.get("model_type") == kind)):
            return stocks
    return None


def check_config_body(config_dict: dict) -> None:
    """A `ValueError` when a config.json of the family says one member in `model_type` ("sam2", "sam2_split", ...)
    and holds another's sizes (e.g. SAM-HQ's with model_type "sam2", which would fail deep inside transformers)."""
    model_type = str(config_dict.get("model_type"))
    said = next((member for member in MEMBERS if model_type in member.model_types), None)
    held = _held_member(config_dict)
    if said is None or held is None or set(held) & set(said.stock_types):
        return
    holder = member_for_model_type(held[0])
    raise ValueError(f"this is a {holder.name} checkpoint: its config.json holds {holder.name}'s sizes but says "
                     f"model_type {model_type!r} ({said.name}); correct its model_type")


__all__ = ["MEMBERS", "Member", "RANDOM_PREFIX", "SAM3_TRACKER_SIZES", "allow_checkpointing_", "check_config_body",
           "checkpoint_model_type", "image_member", "mask_grid_size", "member_for_config", "member_for_model_type",
           "member_for_random", "random_names", "random_stock_model", "randomize_", "trainable_"]
