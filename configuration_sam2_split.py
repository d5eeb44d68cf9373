"""Configuration of SAM 2 / 2.1 with split `q`/`k`/`v` Hiera attention (`model_type="sam2_split"`).

The sizes are exactly those of transformers' `Sam2Config` (the image model); only `model_type` differs from `"sam2"`,
so that `AutoConfig` picks this class (and the repository's own code) instead of the built-in one.
"""

from transformers import Sam2Config


def _hiera(hidden_size, heads, blocks_per_stage, global_attention_blocks, window_size_per_stage=(8, 4, 14, 7),
           background=(7, 7)) -> dict:
    """A SAM 2.1 size as `Sam2Config` arguments: Hiera doubles the width and the heads at each of its 4 stages."""
    widths = [hidden_size * 2**stage for stage in range(4)]
    return dict(vision_config=dict(
        backbone_config=dict(
            model_type="sam2_hiera_det_model", hidden_size=hidden_size, num_attention_heads=heads,
            blocks_per_stage=list(blocks_per_stage),
            embed_dim_per_stage=widths, num_attention_heads_per_stage=[heads * 2**stage for stage in range(4)],
            window_size_per_stage=list(window_size_per_stage), global_attention_blocks=list(global_attention_blocks),
            window_positional_embedding_background_size=list(background),
        ),
        backbone_channel_list=widths[::-1],
    ))


# The sizes of the released SAM 2.1 checkpoints (facebook/sam2.1-hiera-tiny, -small, -base-plus, -large); every other
# size is Sam2Config's default. The one table of SAM 2 sizes: push.py and the tests read it.
SAM2_SIZES = {
    "hiera-tiny": _hiera(96, 1, [1, 2, 7, 2], [5, 7, 9]),
    "hiera-small": _hiera(96, 1, [1, 2, 11, 2], [7, 10, 13]),
    "hiera-base-plus": _hiera(112, 2, [2, 3, 16, 3], [12, 16, 20], background=(14, 14)),
    "hiera-large": _hiera(144, 2, [2, 6, 36, 4], [23, 33, 43], window_size_per_stage=(8, 4, 16, 8)),
}

# Written into every saved config.json, so that the repository loads its own copy of the code (a fork or a pinned
# revision runs the code that sits beside its weights).
AUTO_MAP = {
    "AutoConfig": "configuration_sam2_split.Sam2SplitConfig",
    "AutoModel": "modeling_sam2_split.Sam2SplitModel",
    "AutoModelForMaskGeneration": "modeling_sam2_split.Sam2SplitModel",
}


class Sam2SplitConfig(Sam2Config):
    r"""
    Configuration of a [`Sam2SplitModel`]: exactly the arguments of [`~transformers.Sam2Config`].

    Args:
        vision_config (`dict` or `Sam2VisionConfig`, *optional*):
            Vision encoder (Hiera backbone and FPN neck) sizes; defaults to SAM 2.1 hiera-tiny's, as in `Sam2Config`.
        prompt_encoder_config (`dict` or `Sam2PromptEncoderConfig`, *optional*):
            Prompt encoder sizes.
        mask_decoder_config (`dict` or `Sam2MaskDecoderConfig`, *optional*):
            Mask decoder sizes.
        kwargs (*optional*):
            Anything else `Sam2Config` / `PretrainedConfig` accepts.
    """

    model_type = "sam2_split"

    def __init__(self, *args, **kwargs):  # the stock config's arguments, positional ones included
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(*args, **kwargs)


__all__ = ["SAM2_SIZES", "Sam2SplitConfig"]
