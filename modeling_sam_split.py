"""SAM with separate `q`, `k`, `v` projections in the vision encoder, so PEFT can put LoRA on `q` and `v` alone.

`SamSplitModel` is transformers' `SamModel` but for one class: every vision attention block holds three `nn.Linear`
named `q`, `k`, `v` instead of one fused `qkv`. Outputs equal `SamModel`'s on the same weights. Stock checkpoints are
converted explicitly (`from_sam` / `to_sam`): transformers 5 loads weights without calling module hooks, so a
`load_state_dict` pre-hook (the recipe this replaces) would leave q/k/v randomly initialised without a word.

Supported: transformers 4.57 and 5.x. Only torch and transformers are imported, as the Hub's remote-code loader demands.
"""

import inspect
import os

import torch
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention
from transformers.utils import logging

from .attention_sam_split import SplitRelPosAttentionMixin
from .compat import CheckpointingMixin, register_for_mask_generation
from .configuration_sam_split import SamSplitConfig
from .split_qkv import SplitTwinMixin, fuse_qkv_state_dict, load_stock, split_qkv_state_dict

logger = logging.get_logger(__name__)

_SAM_FORWARD = inspect.signature(SamModel.forward)


class SamSplitVisionAttention(SplitRelPosAttentionMixin, SamVisionAttention):
    """SAM vision attention with decomposed relative positions, computed from separate `q`, `k`, `v` projections
    (the body is `attention_sam_split.SplitRelPosAttentionMixin`, shared with the SAM-HQ twin).

    It subclasses `SamVisionAttention` for its relative-position helpers and so that transformers still records its
    attention weights (`output_attentions`) and initialises its `rel_pos_h`/`rel_pos_w`.
    """


def _check_shape(name: str, tensor, shape) -> None:
    """Raise a `ValueError` unless `tensor` is None or a tensor of `shape` (None entries match any size)."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != len(shape) or any(
        want is not None and have != want for have, want in zip(tensor.shape, shape)
    ):
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        wanted = ", ".join("*" if size is None else str(size) for size in shape)
        raise ValueError(f"`{name}` must have shape ({wanted}), got {got}.")


def _forward_arguments(model, args: tuple, kwargs: dict) -> dict | None:
    """`model(*args, **kwargs)`'s arguments by name, bound to the `forward` that call runs (SamModel's, or one a tool
    patched in: `inspect.signature` follows `functools.wraps`); None where positional ones cannot be named."""
    forward = model.forward
    signature = _SAM_FORWARD if getattr(forward, "__func__", None) is SamModel.forward else inspect.signature(forward)
    try:
        bound = signature.bind_partial(*((model,) if signature is _SAM_FORWARD else ()), *args, **kwargs)
    except TypeError:
        return None
    inputs = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if name in inputs and parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return None  # positional arguments a wrapper passes on unnamed
        if name in inputs and parameter.kind is inspect.Parameter.VAR_KEYWORD:
            inputs.update(inputs.pop(name))
    return inputs


class SamSplitModel(SplitTwinMixin, CheckpointingMixin, SamModel):
    """`SamModel` whose vision attention blocks have separate `q`, `k`, `v` linears (see `SamSplitVisionAttention`).

    Everything else (prompt encoder, mask decoder, `forward`, `get_image_embeddings`, ...) is `SamModel`'s. Strict
    loading and the conversion from and to stock SAM (`from_sam` / `to_sam`, also named `from_stock` / `to_stock`)
    are `split_qkv.SplitTwinMixin`'s.
    """

    config_class = SamSplitConfig
    stock_class = SamModel
    stock_config_class = SamConfig
    stock_model_types = {"sam": (SamModel, None)}
    stock_name = "SAM"
    conversion_name = "from_sam"

    def __init__(self, config: SamSplitConfig):
        super().__init__(config)
        # Built before any weight is loaded, so loading fills q/k/v from the checkpoint like every other weight.
        for layer in self.vision_encoder.layers:
            layer.attn = SamSplitVisionAttention(config.vision_config, layer.window_size)
        self.register_forward_pre_hook(self._check_inputs, with_kwargs=True)
        self.post_init()

    @staticmethod
    def _check_inputs(model, args: tuple, kwargs: dict) -> None:
        """A forward pre-hook: checks the shapes of `SamModel.forward`'s inputs, so that a wrong shape is reported as
        such instead of failing deep inside the model or broadcasting into a wrong result. (A hook rather than a
        `forward` override: `forward` stays SamModel's, whatever arguments transformers gives it.)

        The arguments are bound to the `forward` that will run: a tool may patch or wrap it (optimum's exporter does).
        When they cannot be named (a wrapper's `*args`, or a signature they do not fit), that forward is left to judge.
        """
        inputs = _forward_arguments(model, args, kwargs)
        if inputs is None:
            return
        pixel_values, image_embeddings = inputs.get("pixel_values"), inputs.get("image_embeddings")
        input_points, input_labels = inputs.get("input_points"), inputs.get("input_labels")
        input_boxes, input_masks = inputs.get("input_boxes"), inputs.get("input_masks")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_embeddings`.")
        if input_labels is not None and input_points is None:
            raise ValueError("`input_labels` were given without `input_points`: labels describe points.")
        vision = model.config.vision_config
        grid = vision.image_size // vision.patch_size
        if pixel_values is not None:
            _check_shape("pixel_values", pixel_values,
                         (None, vision.num_channels, vision.image_size, vision.image_size))
            batch_size = pixel_values.shape[0]
        else:
            _check_shape("image_embeddings", image_embeddings, (None, vision.output_channels, grid, grid))
            batch_size = image_embeddings.shape[0]
        _check_shape("input_points", input_points, (batch_size, None, None, 2))
        _check_shape("input_labels", input_labels, input_points.shape[:-1] if input_points is not None else ())
        _check_shape("input_boxes", input_boxes, (batch_size, None, 4))
        # The mask prompt is SAM's low-resolution mask logits: 4x the embedding grid (256x256 for 1024 images).
        _check_shape("input_masks", input_masks, (batch_size, 1, 4 * grid, 4 * grid))
        if input_points is not None and input_labels is None:
            logger.warning_once(
                "`input_points` without `input_labels`: every point is taken as foreground (label 1), as SamModel "
                "does. Pass `input_labels` (1 foreground, 0 background, -10 padding) to choose."
            )

    @classmethod
    def from_sam(cls, sam: "SamModel | str | os.PathLike", **from_pretrained_kwargs) -> "SamSplitModel":
        """Convert a stock `SamModel`: an instance, a local checkpoint folder or a Hub id (then loaded with
        `SamModel.from_pretrained(sam, **from_pretrained_kwargs)`, e.g. `revision=...`, `dtype=...`).

        The fused `qkv` rows are split in order (q, k, v), weights and biases alike; every other weight is shared as is.
        """
        return cls.from_stock(sam, **from_pretrained_kwargs)

    def to_sam(self) -> SamModel:
        """A stock `SamModel` with fused `qkv` and exactly these weights, usable without remote code."""
        return self.to_stock()


def load_stock_sam(name_or_path, **from_pretrained_kwargs) -> SamModel:
    """`SamModel.from_pretrained`, refusing non-SAM checkpoints and incomplete ones instead of warning."""
    return load_stock(SamSplitModel, name_or_path, **from_pretrained_kwargs)[0]


# `save_pretrained` copies the code files this model imports next to the weights and writes `auto_map`.
SamSplitConfig.register_for_auto_class()
SamSplitModel.register_for_auto_class("AutoModel")
register_for_mask_generation(SamSplitConfig.model_type, SamSplitModel.__name__)

__all__ = ["SamSplitModel", "SamSplitVisionAttention", "load_stock_sam", "split_qkv_state_dict", "fuse_qkv_state_dict"]
