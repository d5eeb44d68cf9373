"""Configuration of SAM 2 / 2.1 *video* with split `q`/`k`/`v` Hiera attention (`model_type="sam2_video_split"`).

The sizes are exactly those of transformers' `Sam2VideoConfig` (vision encoder, prompt encoder, mask decoder and the
video memory modules); only `model_type` differs from `"sam2_video"`, so that `AutoConfig` picks this class (and the
repository's own code) instead of the built-in one.
"""

from transformers import Sam2VideoConfig

# Not a released size: a SAM 2 video model that tracks on a 2-core CPU in a fraction of a second a frame, with every
# Hiera block kind (windowed, global, query-pooling stage starts), for tests and for trying the tracker
# (`random:sam2.1-video-tiny`).
# The memory sizes are as small as the model allows: object pointers are cut into memory-wide (64) pieces, so the
# FPN width (the pointers' width) must be a larger multiple of it.
SAM2_VIDEO_TINY = dict(
    vision_config=dict(
        backbone_config=dict(
            model_type="sam2_hiera_det_model", hidden_size=16, num_attention_heads=1, image_size=[128, 128],
            blocks_per_stage=[1, 2, 3, 2], embed_dim_per_stage=[16, 32, 64, 128],
            num_attention_heads_per_stage=[1, 2, 4, 8], window_size_per_stage=[4, 2, 4, 2],
            global_attention_blocks=[4, 7], window_positional_embedding_background_size=[4, 4],
        ),
        backbone_channel_list=[128, 64, 32, 16], backbone_feature_sizes=[[32, 32], [16, 16], [8, 8]],
        fpn_hidden_size=128,
    ),
    prompt_encoder_config=dict(hidden_size=128, image_size=128, patch_size=16),
    mask_decoder_config=dict(hidden_size=128, num_attention_heads=2, mlp_dim=64, iou_head_hidden_dim=32),
    image_size=128, memory_attention_hidden_size=128, memory_attention_feed_forward_hidden_size=64,
    memory_attention_rope_feat_sizes=[8, 8], memory_encoder_hidden_size=128, memory_encoder_output_channels=64,
    mask_downsampler_embed_dim=128, memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64,
)

# Written into every saved config.json, so that the repository loads its own copy of the code.
AUTO_MAP = {
    "AutoConfig": "configuration_sam2_video_split.Sam2VideoSplitConfig",
    "AutoModel": "modeling_sam2_video_split.Sam2VideoSplitModel",
}


class Sam2VideoSplitConfig(Sam2VideoConfig):
    r"""
    Configuration of a [`Sam2VideoSplitModel`]: exactly the arguments of [`~transformers.Sam2VideoConfig`].

    Args:
        vision_config (`dict` or `Sam2VisionConfig`, *optional*):
            Vision encoder (Hiera backbone and FPN neck) sizes; defaults to SAM 2.1 hiera-tiny's, as in
            `Sam2VideoConfig`.
        prompt_encoder_config (`dict` or `Sam2VideoPromptEncoderConfig`, *optional*):
            Prompt encoder sizes.
        mask_decoder_config (`dict` or `Sam2VideoMaskDecoderConfig`, *optional*):
            Mask decoder sizes.
        kwargs (*optional*):
            Anything else `Sam2VideoConfig` / `PretrainedConfig` accepts: the memory attention, memory encoder and
            tracking settings.
    """

    model_type = "sam2_video_split"

    def __init__(self, *args, **kwargs):  # the stock config's arguments, positional ones included
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(*args, **kwargs)


__all__ = ["SAM2_VIDEO_TINY", "Sam2VideoSplitConfig"]
