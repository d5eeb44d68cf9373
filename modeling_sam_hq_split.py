"""SAM-HQ with separate `q`, `k`, `v` projections in the vision encoder, so PEFT can put LoRA on `q` and `v` alone.

`SamHQSplitModel` is transformers' `SamHQModel` but for the vision attention: every vision layer holds three
`nn.Linear` named `q`, `k`, `v` instead of one fused `qkv`. SAM-HQ's vision attention is SAM's (same decomposed
relative positions), so the body and its per-device kernels are the SAM twin's (`attention_sam_split.py`). Outputs
(masks, IoU scores, image and intermediate embeddings, `hq_token_only`) equal `SamHQModel`'s on the same weights.

Supported: transformers 4.57 and 5.x. Only torch and transformers are imported, as the Hub's remote-code loader demands.
"""

from transformers import SamHQConfig, SamHQModel
from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionAttention

from .attention_sam_split import SplitRelPosAttentionMixin
from .compat import CheckpointingMixin, register_for_mask_generation
from .configuration_sam_hq_split import SamHQSplitConfig
from .split_qkv import SplitTwinMixin


class SamHQSplitVisionAttention(SplitRelPosAttentionMixin, SamHQVisionAttention):
    """SAM-HQ vision attention from separate `q`, `k`, `v` projections (body: `SplitRelPosAttentionMixin`).

    It subclasses `SamHQVisionAttention` for its relative-position tables and helpers, and so that transformers
    still records its attention weights (`output_attentions`).
    """


class SamHQSplitModel(SplitTwinMixin, CheckpointingMixin, SamHQModel):
    """`SamHQModel` whose vision attention layers have separate `q`, `k`, `v` linears.

    Everything else (prompt encoder, HQ mask decoder, `forward`, ...) is `SamHQModel`'s. Strict loading and the
    conversion from and to stock SAM-HQ (`from_stock` / `to_stock`) are `split_qkv.SplitTwinMixin`'s.
    """

    config_class = SamHQSplitConfig
    stock_class = SamHQModel
    stock_config_class = SamHQConfig
    stock_model_types = {"sam_hq": (SamHQModel, None)}
    stock_name = "SAM-HQ"

    def __init__(self, config: SamHQSplitConfig):
        super().__init__(config)
        # Built before any weight is loaded, so loading fills q/k/v from the checkpoint like every other weight.
        for layer in self.vision_encoder.layers:
            layer.attn = SamHQSplitVisionAttention(config.vision_config, layer.window_size)
        self.post_init()


# `save_pretrained` copies the code files next to the weights and writes `auto_map` (see configuration_sam_hq_split).
SamHQSplitConfig.register_for_auto_class()
SamHQSplitModel.register_for_auto_class("AutoModel")
register_for_mask_generation(SamHQSplitConfig.model_type, SamHQSplitModel.__name__)

__all__ = ["SamHQSplitModel", "SamHQSplitVisionAttention"]
