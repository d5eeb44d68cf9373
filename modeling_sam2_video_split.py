"""SAM 2 / 2.1 *video* (the tracker) with separate `q`, `k`, `v` projections in the Hiera encoder, so that a q/v LoRA
adapter trained on images with the image twin (`Sam2SplitModel`) runs in the tracker.

`Sam2VideoSplitModel` is transformers' `Sam2VideoModel` but for the Hiera attention, which is the image twin's
`Sam2SplitMultiScaleAttention` (the vision encoder is the same `Sam2VisionModel` in both models, so the module names,
`vision_encoder.backbone.blocks.N.attn.q` / `.k` / `.v`, are the image twin's too). Every video memory weight (memory
attention, memory encoder, object pointers, ...) is kept; `forward`, `propagate_in_video_iterator` and the inference
session are stock's, and so are the tracked masks on the same weights.

Converting is strict both ways (`from_stock` / `to_stock`): a missing or unexpected weight is an error.
Supported: transformers 4.57 and 5.x. Only torch and transformers are imported, as the Hub's remote-code loader demands.
"""

from transformers import Sam2VideoConfig, Sam2VideoModel

from .compat import CheckpointingMixin
from .configuration_sam2_split import Sam2SplitConfig  # noqa: F401 - see below
from .configuration_sam2_video_split import Sam2VideoSplitConfig
from .modeling_sam2_split import split_hiera_attention_
from .split_qkv import SplitTwinMixin

# transformers 4.57's remote-code loader copies into its modules cache only the files that the model's file imports
# itself, then requires every file they import in turn: the image twin's configuration, imported by its modeling file,
# is imported here too so that it is copied (5.x copies them all).


class Sam2VideoSplitModel(SplitTwinMixin, CheckpointingMixin, Sam2VideoModel):
    """`Sam2VideoModel` whose Hiera blocks have separate `q`, `k`, `v` linears (see
    `modeling_sam2_split.Sam2SplitMultiScaleAttention`); everything else is `Sam2VideoModel`'s. Strict loading and the
    conversion from and to stock SAM 2 video (`from_stock` / `to_stock`) are `split_qkv.SplitTwinMixin`'s.
    """

    config_class = Sam2VideoSplitConfig
    stock_class = Sam2VideoModel
    stock_config_class = Sam2VideoConfig
    stock_model_types = {"sam2_video": (Sam2VideoModel, None)}
    stock_name = "SAM 2 video"
    supports_gradient_checkpointing = True  # the Hiera blocks are checkpointing layers; stock only does not say so

    def __init__(self, config: Sam2VideoSplitConfig):
        super().__init__(config)
        split_hiera_attention_(self.vision_encoder)
        self.post_init()


# `save_pretrained` copies the code files next to the weights and writes `auto_map` (configuration_sam2_video_split).
Sam2VideoSplitConfig.register_for_auto_class()
Sam2VideoSplitModel.register_for_auto_class("AutoModel")

__all__ = ["Sam2VideoSplitModel"]
