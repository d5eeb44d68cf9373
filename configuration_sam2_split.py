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
# Not a released size: a small SAM 2 (256x256 images, Hiera widths 32-256, every block kind: windowed, global and
# stage-start blocks that pool the query) that fine-tunes in minutes on a 2-core CPU, for trying the tools end to end
# (`random:sam2.1-tiny`). Complete config arguments, as its neck, prompt encoder and mask decoder are small too.
SAM2_TINY = dict(
    vision_config=dict(
        backbone_config=dict(
            model_type="sam2_hiera_det_model", hidden_size=32, num_attention_heads=1, image_size=[256, 256],
            blocks_per_stage=[1, 2, 3, 1], embed_dim_per_stage=[32, 64, 128, 256],
            num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[8, 4, 8, 8],
            global_attention_blocks=[5], window_positional_embedding_background_size=[8, 8],
        ),
        backbone_channel_list=[256, 128, 64, 32], backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        fpn_hidden_size=64,
    ),
    prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16),
    mask_decoder_config=dict(hidden_size=64, num_attention_heads=4, mlp_dim=256, iou_head_hidden_dim=64),
)

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


__all__ = ["SAM2_SIZES", "SAM2_TINY", "Sam2SplitConfig"]
