"""Configuration of SAM-HQ with split `q`/`k`/`v` vision attention (`model_type="sam_hq_split"`).

The sizes are exactly those of transformers' `SamHQConfig`; only `model_type` differs from `"sam_hq"`, so that
`AutoConfig` picks this class (and the repository's own code) instead of the built-in one.
"""

from transformers import SamHQConfig

# The sizes of the released SAM-HQ checkpoints (syscv-community/sam-hq-vit-base, -large, -huge): SAM's vision
# encoders, and a mask decoder that reads the encoder's first global layer (`vit_dim` wide). Every other size is
# SamHQConfig's default. The one table of SAM-HQ sizes: push.py and the tests read it.
SAM_HQ_SIZES = {
    "vit-base": dict(
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           global_attn_indexes=[2, 5, 8, 11]),
        mask_decoder_config=dict(vit_dim=768),
    ),
    "vit-large": dict(
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           global_attn_indexes=[5, 11, 17, 23]),
        mask_decoder_config=dict(vit_dim=1024),
    ),
    "vit-huge": dict(
        vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                           global_attn_indexes=[7, 15, 23, 31]),
        mask_decoder_config=dict(vit_dim=1280),
    ),
}
# Not a released size: SAM's `random:sam-tiny` (256x256 images, 4 vision layers 64 wide) with SAM-HQ's mask decoder,
# which fine-tunes in minutes on a 2-core CPU (`random:sam-hq-tiny`).
SAM_HQ_TINY = dict(
    vision_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=256, patch_size=16,
                       window_size=8, global_attn_indexes=[1, 3], output_channels=64, num_pos_feats=32, mlp_dim=256),
    prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16),
    mask_decoder_config=dict(hidden_size=64, num_attention_heads=4, mlp_dim=256, iou_head_hidden_dim=64, vit_dim=64),
)

# Written into every saved config.json, so that the repository loads its own copy of the code (a fork or a pinned
# revision runs the code that sits beside its weights).
AUTO_MAP = {
    "AutoConfig": "configuration_sam_hq_split.SamHQSplitConfig",
    "AutoModel": "modeling_sam_hq_split.SamHQSplitModel",
    "AutoModelForMaskGeneration": "modeling_sam_hq_split.SamHQSplitModel",
}


class SamHQSplitConfig(SamHQConfig):
    r"""
    Configuration of a [`SamHQSplitModel`]: exactly the arguments of [`~transformers.SamHQConfig`].

    Args:
        vision_config (`dict` or `SamHQVisionConfig`, *optional*):
            Vision encoder sizes; defaults to those of SAM-HQ vit-huge, as in `SamHQConfig`.
        prompt_encoder_config (`dict` or `SamHQPromptEncoderConfig`, *optional*):
            Prompt encoder sizes.
        mask_decoder_config (`dict` or `SamHQMaskDecoderConfig`, *optional*):
            Mask decoder sizes (`vit_dim` must be the vision encoder's `hidden_size`).
        kwargs (*optional*):
            Anything else `SamHQConfig` / `PretrainedConfig` accepts.

    Raises:
        `ValueError`: when the mask decoder's `vit_dim` is not the vision encoder's `hidden_size` (SamHQModel would
        fail at its first forward).
    """

    model_type = "sam_hq_split"

    def __init__(self, *args, **kwargs):  # the stock config's arguments, positional ones included
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(*args, **kwargs)
        if self.mask_decoder_config.vit_dim != self.vision_config.hidden_size:
            raise ValueError(
                f"SamHQSplitConfig: `mask_decoder_config.vit_dim` = {self.mask_decoder_config.vit_dim} is invalid: "
                f"must equal vision_config.hidden_size ({self.vision_config.hidden_size})."
            )


__all__ = ["SAM_HQ_SIZES", "SAM_HQ_TINY", "SamHQSplitConfig"]
