"""Configuration of SAM with split `q`/`k`/`v` vision attention (`model_type="sam_split"`).

The sizes are exactly those of transformers' `SamConfig`: a split checkpoint and its stock twin share one config but
for `model_type`, which must differ from `"sam"` so that `AutoConfig` picks this class (and the remote code) instead of
the built-in one.
"""

from transformers import SamConfig

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
        `ValueError`: naming the field, its value and what is allowed, when the sizes cannot build a SAM model.
    """

    model_type = "sam_split"

    def __init__(self, vision_config=None, prompt_encoder_config=None, mask_decoder_config=None, **kwargs):
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(
            vision_config=vision_config,
            prompt_encoder_config=prompt_encoder_config,
            mask_decoder_config=mask_decoder_config,
            **kwargs,
        )
        check_sam_sizes(self)


def _require(condition: bool, field: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"SamSplitConfig: `{field}` = {value!r} is invalid: {allowed}.")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_sam_sizes(config: SamConfig) -> None:
    """Raise a `ValueError` naming the first field of `config` (a `SamConfig`) that cannot build a SAM model."""
    vision = config.vision_config
    prompt = config.prompt_encoder_config
    decoder = config.mask_decoder_config
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size",
                 "output_channels", "window_size", "mlp_dim"):
        value = getattr(vision, name)
        _require(_is_positive_int(value), f"vision_config.{name}", value, "expected a positive integer")
    _require(
        vision.hidden_size % vision.num_attention_heads == 0,
        "vision_config.hidden_size",
        vision.hidden_size,
        f"must be divisible by vision_config.num_attention_heads ({vision.num_attention_heads})",
    )
    _require(
        vision.image_size % vision.patch_size == 0,
        "vision_config.image_size",
        vision.image_size,
        f"must be a multiple of vision_config.patch_size ({vision.patch_size})",
    )
    global_indexes = list(vision.global_attn_indexes)
    _require(
        all(isinstance(i, int) and 0 <= i < vision.num_hidden_layers for i in global_indexes)
        and len(set(global_indexes)) == len(global_indexes),
        "vision_config.global_attn_indexes",
        vision.global_attn_indexes,
        f"expected distinct layer indexes in [0, {vision.num_hidden_layers - 1}] (num_hidden_layers="
        f"{vision.num_hidden_layers})",
    )
    _require(
        0.0 <= vision.attention_dropout < 1.0,
        "vision_config.attention_dropout",
        vision.attention_dropout,
        "expected a probability in [0, 1)",
    )
    # The prompt encoder and mask decoder read the image embedding the vision encoder makes: same grid, same width.
    for name in ("image_size", "patch_size"):
        _require(
            getattr(prompt, name) == getattr(vision, name),
            f"prompt_encoder_config.{name}",
            getattr(prompt, name),
            f"must equal vision_config.{name} ({getattr(vision, name)})",
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
    _require(_is_positive_int(decoder.num_attention_heads), "mask_decoder_config.num_attention_heads",
             decoder.num_attention_heads, "expected a positive integer")
    _require(
        decoder.hidden_size % (decoder.num_attention_heads * decoder.attention_downsample_rate) == 0,
        "mask_decoder_config.hidden_size",
        decoder.hidden_size,
        f"must be divisible by num_attention_heads * attention_downsample_rate "
        f"({decoder.num_attention_heads} * {decoder.attention_downsample_rate})",
    )


__all__ = ["SamSplitConfig"]
