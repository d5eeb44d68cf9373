"""Configuration of SAM with split `q`/`k`/`v` vision attention (`model_type="sam_split"`).

The sizes are exactly those of transformers' `SamConfig`: a split checkpoint and its stock twin share one config but
for `model_type`, which must differ from `"sam"` so that `AutoConfig` picks this class (and the remote code) instead of
the built-in one.
"""

import math
from functools import cache

from transformers import SamConfig

# Vision-encoder sizes of the three released SAM checkpoints (facebook/sam-vit-base, -large, -huge); every other size
# is SamConfig's default, the same in all three. The one table of SAM sizes: push.py, the tests and the benchmarks
# read it, and the upper limits below are derived from it.
SAM_SIZES = {
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      global_attn_indexes=[5, 11, 17, 23]),
    "vit-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                     global_attn_indexes=[7, 15, 23, 31]),
}
# Not a released size: a small SAM (256x256 images, 4 vision layers 64 wide) that fine-tunes in minutes on a 2-core CPU,
# for trying the tools end to end (`random:sam-tiny`). Complete config arguments, as its prompt encoder and mask decoder
# shrink with it.
SAM_TINY = dict(
    vision_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=256, patch_size=16,
                       window_size=8, global_attn_indexes=[1, 3], output_channels=64, num_pos_feats=32, mlp_dim=256),
    prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16),
    mask_decoder_config=dict(hidden_size=64, num_attention_heads=4, mlp_dim=256, iou_head_hidden_dim=64),
)
# A size more than this many times its largest value in any released SAM is refused as absurd: such a config (a typo,
# `1e6` layers) would otherwise make `from_pretrained` allocate for minutes before failing.
SIZE_LIMIT_FACTOR = 4
# The integer sizes checked, with their smallest allowed value. A window of 0 makes every vision layer global (SamModel
# builds that); every other size must be at least 1.
_SIZE_FIELDS = {
    "vision_config": {"hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1, "num_channels": 1,
                      "image_size": 1, "patch_size": 1, "output_channels": 1, "window_size": 0, "mlp_dim": 1,
                      "num_pos_feats": 1},
    "prompt_encoder_config": {"hidden_size": 1, "image_size": 1, "patch_size": 1, "mask_input_channels": 1,
                              "num_point_embeddings": 1},
    "mask_decoder_config": {"hidden_size": 1, "mlp_dim": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
                            "attention_downsample_rate": 1, "num_multimask_outputs": 1, "iou_head_depth": 1,
                            "iou_head_hidden_dim": 1},
}

# Written into every saved config.json, so that the repository loads its own copy of the code (a fork or a pinned
# revision runs the code that sits beside its weights, never code fetched from another repository).
AUTO_MAP = {
    "AutoConfig": "configuration_sam_split.SamSplitConfig",
    "AutoModel": "modeling_sam_split.SamSplitModel",
    "AutoModelForMaskGeneration": "modeling_sam_split.SamSplitModel",
}


class SamSplitConfig(SamConfig):
    r"""
    Configuration of a [`SamSplitModel`]. It takes exactly the arguments of [`~transformers.SamConfig`] and checks them.

    Args:
        vision_config (`dict` or `SamVisionConfig`, *optional*):
            Vision encoder sizes; defaults to those of `facebook/sam-vit-huge`, as in `SamConfig`.
        prompt_encoder_config (`dict` or `SamPromptEncoderConfig`, *optional*):
            Prompt encoder sizes.
        mask_decoder_config (`dict` or `SamMaskDecoderConfig`, *optional*):
            Mask decoder sizes.
        kwargs (*optional*):
            Anything else `SamConfig` / `PretrainedConfig` accepts (`initializer_range`, `attn_implementation`, ...).

    Raises:
        `ValueError`: naming the field, its value and what is allowed, when `SamModel` cannot be built or run with
        the sizes, or one is absurdly large (over `SIZE_LIMIT_FACTOR` times the largest released SAM's).
    """

    model_type = "sam_split"

    def __init__(self, *args, **kwargs):  # the stock config's arguments, positional ones included
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(*args, **kwargs)
        check_sam_sizes(self)


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"SamSplitConfig: `{field}` = {value!r} is invalid: {allowed}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@cache
def size_limits() -> dict[str, int]:
    """{"vision_config.hidden_size": 5120, ...}: `SIZE_LIMIT_FACTOR` times the largest value of each size field among
    the released SAMs (`SAM_SIZES` on top of `SamConfig`'s defaults)."""
    configs = [SamConfig(vision_config=sizes) for sizes in SAM_SIZES.values()]
    return {
        f"{part}.{name}": SIZE_LIMIT_FACTOR * max(getattr(getattr(config, part), name) for config in configs)
        for part, fields in _SIZE_FIELDS.items()
        for name in fields
    }


def check_sam_sizes(config: SamConfig) -> None:
    """Raise a `ValueError` naming the first field of `config` (a `SamConfig`) that SamModel cannot build or run with,
    or that is absurdly large (see `SIZE_LIMIT_FACTOR`). Everything SamModel runs with is accepted, e.g. entries of
    `global_attn_indexes` that name no layer: SamModel ignores them, and SamVisionConfig's default ([2, 5, 8, 11]) has
    such entries in any model with fewer than 12 layers."""
    limits = size_limits()
    for part, fields in _SIZE_FIELDS.items():
        for name, smallest in fields.items():
            field, value = f"{part}.{name}", getattr(getattr(config, part), name)
            _require(_is_int(value) and smallest <= value <= limits[field], field, value,
                     f"expected an integer from {smallest} to {limits[field]} ({SIZE_LIMIT_FACTOR} times the largest "
                     "released SAM's)")
    vision = config.vision_config
    prompt = config.prompt_encoder_config
    decoder = config.mask_decoder_config
    _require(
        vision.hidden_size % vision.num_attention_heads == 0,
        "vision_config.hidden_size",
        vision.hidden_size,
        f"must be divisible by vision_config.num_attention_heads ({vision.num_attention_heads})",
    )
    _require(
        vision.patch_size <= vision.image_size,
        "vision_config.patch_size",
        vision.patch_size,
        f"must be at most vision_config.image_size ({vision.image_size})",
    )
    _require(
        all(_is_int(index) for index in vision.global_attn_indexes),
        "vision_config.global_attn_indexes",
        vision.global_attn_indexes,
        "expected a list of layer indexes (integers)",
    )
    _require(
        0.0 <= vision.attention_dropout <= 1.0,
        "vision_config.attention_dropout",
        vision.attention_dropout,
        "expected a probability in [0, 1]",
    )
    # A non-positive or non-finite epsilon makes every layer norm divide by zero or by a negative variance: NaN masks.
    # Any other value runs (SamModel's own tests use 1.0): only those are refused.
    for part in _SIZE_FIELDS:
        eps = getattr(getattr(config, part), "layer_norm_eps", 1e-6)
        _require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0,
                 f"{part}.layer_norm_eps", eps, "expected a finite positive number (the released SAMs use 1e-6)")
    # The prompt encoder's positional grid is added to the image embedding the vision encoder makes: same grid, width.
    grid = vision.image_size // vision.patch_size
    _require(
        prompt.image_size // prompt.patch_size == grid,
        "prompt_encoder_config.image_size",
        prompt.image_size,
        f"prompt_encoder_config.image_size // patch_size ({prompt.image_size} // {prompt.patch_size}) must equal the "
        f"vision encoder's grid, vision_config.image_size // patch_size ({grid})",
    )
    for field, value in (("prompt_encoder_config.hidden_size", prompt.hidden_size),
                         ("mask_decoder_config.hidden_size", decoder.hidden_size)):
        _require(
            value == vision.output_channels,
            field,
            value,
            f"must equal vision_config.output_channels ({vision.output_channels})",
        )
    # The positional encoding of points and of the image grid is `2 * num_pos_feats` wide (sines and cosines).
    _require(
        2 * vision.num_pos_feats == vision.output_channels,
        "vision_config.num_pos_feats",
        vision.num_pos_feats,
        f"must be half of vision_config.output_channels ({vision.output_channels})",
    )
    # The mask decoder's attentions split `hidden_size` (self-attention) and `hidden_size // attention_downsample_rate`
    # (cross-attention) into heads.
    for width, described in ((decoder.hidden_size, "hidden_size"),
                             (decoder.hidden_size // decoder.attention_downsample_rate,
                              "hidden_size // attention_downsample_rate")):
        _require(
            width % decoder.num_attention_heads == 0,
            "mask_decoder_config.num_attention_heads",
            decoder.num_attention_heads,
            f"must divide mask_decoder_config.{described} ({width})",
        )


__all__ = ["SAM_SIZES", "SAM_TINY", "SamSplitConfig"]
