"""SAM 2 / 2.1 with separate `q`, `k`, `v` projections in the Hiera encoder, so PEFT can put LoRA on `q` and `v` alone.

`Sam2SplitModel` is transformers' `Sam2Model` (the image model) but for the Hiera attention: every block holds three
`nn.Linear(dim, dim_out)` named `q`, `k`, `v` instead of one fused `qkv` (dim -> 3 * dim_out). In the blocks that
start a stage (`dim != dim_out`) the query is max-pooled, as in stock; the attention function is the one stock calls
(`ALL_ATTENTION_FUNCTIONS`: SDPA, flash, ...), without the eager product stock computes and discards. Gradient
checkpointing works (stock refuses it on transformers 5). Outputs (masks, IoU and object scores, every feature level)
equal `Sam2Model`'s on the same weights.

Stock SAM 2.1 checkpoints on the Hub are SAM 2 *video* models (`model_type="sam2_video"`): converting one builds the
image model and leaves out the video memory weights, with a warning that lists them.

Supported: transformers 4.57 and 5.x. Only torch and transformers are imported, as the Hub's remote-code loader demands.
"""

import torch
from torch import nn
from transformers import Sam2Config, Sam2Model, Sam2VideoModel
from transformers.models.sam2.modeling_sam2 import Sam2MultiScaleAttention, do_pool, eager_attention_forward

from .compat import CheckpointingMixin, attention_function, register_for_mask_generation
from .configuration_sam2_split import Sam2SplitConfig
from .split_qkv import SplitTwinMixin, project_qkv


class Sam2SplitMultiScaleAttention(Sam2MultiScaleAttention):
    """Hiera's multi-scale attention from separate `q`, `k`, `v` = Linear(dim, dim_out), query pooling on q only.

    It subclasses `Sam2MultiScaleAttention` so that transformers still records it (`output_attentions`).
    """

    def __init__(self, config, dim: int, dim_out: int, num_attention_heads: int, query_stride=None):
        super().__init__(config, dim, dim_out, num_attention_heads, query_stride)
        del self.qkv
        self.q = nn.Linear(dim, dim_out)
        self.k = nn.Linear(dim, dim_out)
        self.v = nn.Linear(dim, dim_out)

    def _heads(self, projection: torch.Tensor) -> torch.Tensor:
        """(batch_size, height, width, channel) -> (batch_size, nHead, height * width, head_dim)"""
        batch_size, height, width, _ = projection.shape
        return projection.reshape(batch_size, height * width, self.num_attention_heads, -1).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        # each (batch_size, height, width, dim_out), from one GEMM (`project_qkv`)
        query, key, value = project_qkv(self, hidden_states)
        # Q pooling (for downsample at stage changes): (batch_size, height', width', dim_out)
        query = do_pool(query, self.query_stride) if self.query_stride else query
        height, width = query.shape[1:3]
        attention = attention_function(self.config._attn_implementation, eager_attention_forward)
        attn_output, _ = attention(
            self,
            self._heads(query),
            self._heads(key),
            self._heads(value),
            attention_mask=None,
            is_causal=self.is_causal,
            scaling=self.scale,
            **kwargs,
        )
        # (batch_size, height' * width', nHead, head_dim) -> (batch_size, height', width', dim_out)
        attn_output = attn_output.reshape(batch_size, height, width, -1)
        return self.proj(attn_output)


def split_hiera_attention_(vision_encoder: nn.Module) -> None:
    """Replace the fused-`qkv` attention of every Hiera block of a SAM 2 vision encoder (`Sam2VisionModel`, the image
    and the video model's alike) by `Sam2SplitMultiScaleAttention`, in place. Called in a twin's `__init__`, before any
    weight is loaded, so loading fills q/k/v from the checkpoint like every other weight."""
    for block in vision_encoder.backbone.blocks:
        stock = block.attn
        block.attn = Sam2SplitMultiScaleAttention(
            stock.config, stock.dim, stock.dim_out, stock.num_attention_heads, stock.query_stride
        )


def _sam2_image_config(video_config_dict: dict) -> Sam2Config:
    """The image model's config from a `sam2_video` config dict: its vision encoder, prompt encoder and mask decoder
    (the memory modules' sizes are left out with their weights)."""
    parts = ("vision_config", "prompt_encoder_config", "mask_decoder_config", "initializer_range")
    return Sam2Config(**{name: video_config_dict[name] for name in parts if name in video_config_dict})


class Sam2SplitModel(SplitTwinMixin, CheckpointingMixin, Sam2Model):
    """`Sam2Model` whose Hiera blocks have separate `q`, `k`, `v` linears (see `Sam2SplitMultiScaleAttention`).

    Everything else (FPN neck, prompt encoder, mask decoder, `forward`, ...) is `Sam2Model`'s. Strict loading and the
    conversion from and to stock SAM 2 (`from_stock` / `to_stock`) are `split_qkv.SplitTwinMixin`'s.
    """

    config_class = Sam2SplitConfig
    stock_class = Sam2Model
    stock_config_class = Sam2Config
    # A SAM 2 video checkpoint is loaded whole, strictly; its image model is kept, the memory weights left out.
    stock_model_types = {"sam2": (Sam2Model, None), "sam2_video": (Sam2VideoModel, _sam2_image_config)}
    stock_name = "SAM 2"
    supports_gradient_checkpointing = True  # the Hiera blocks are checkpointing layers; stock only does not say so

    def __init__(self, config: Sam2SplitConfig):
        super().__init__(config)
        split_hiera_attention_(self.vision_encoder)
        self.post_init()


# `save_pretrained` copies the code files next to the weights and writes `auto_map` (see configuration_sam2_split).
Sam2SplitConfig.register_for_auto_class()
Sam2SplitModel.register_for_auto_class("AutoModel")
register_for_mask_generation(Sam2SplitConfig.model_type, Sam2SplitModel.__name__)

__all__ = ["Sam2SplitModel", "Sam2SplitMultiScaleAttention", "split_hiera_attention_"]
