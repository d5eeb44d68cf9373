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
from torch import nn
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention
from transformers.utils import logging

from .attention_sam_split import attention, eager_attention
from .compat import CheckpointingMixin
from .configuration_sam_split import SamSplitConfig

logger = logging.get_logger(__name__)

_PROJECTIONS = ("q", "k", "v")
_SAM_FORWARD = inspect.signature(SamModel.forward)


class SamSplitVisionAttention(SamVisionAttention):
    """SAM vision attention with decomposed relative positions, computed from separate `q`, `k`, `v` projections.

    It subclasses `SamVisionAttention` for its relative-position helpers and so that transformers still records its
    attention weights (`output_attentions`) and initialises its `rel_pos_h`/`rel_pos_w`.

    The implementation is read from the config at every call, so `model.set_attn_implementation()` takes effect:
    - `"eager"`: the stock computation, returning the attention weights.
    - anything else: `attention_sam_split.attention`, which picks a kernel per device, dtype and grad mode that never
      holds stock's `(batch_size, nHead, HW, HW)` bias mask for a whole batch.
    """

    def __init__(self, config, window_size):
        super().__init__(config, window_size)
        del self.qkv
        self.config = config
        self.q = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def _heads(self, projection: torch.Tensor) -> torch.Tensor:
        """(batch_size, height, width, channel) -> (batch_size, nHead, height * width, head_dim)"""
        batch_size, height, width, _ = projection.shape
        return projection.reshape(batch_size, height * width, self.num_attention_heads, -1).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, height, width, _ = hidden_states.shape
        # each (batch_size, nHead, height * width, head_dim)
        query, key, value = (self._heads(getattr(self, name)(hidden_states)) for name in _PROJECTIONS)
        rel_h, rel_w = self._decomposed_rel_pos(query, height, width) if self.use_rel_pos else (None, None)
        dropout = self.dropout if self.training else 0.0

        if self.config._attn_implementation == "eager":
            attn_output, attn_weights = eager_attention(query, key, value, rel_h, rel_w, self.scale, dropout)
        else:
            attn_output, attn_weights = attention(query, key, value, rel_h, rel_w, self.scale, dropout), None

        # (batch_size, nHead, height * width, head_dim) -> (batch_size, height, width, channel)
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, height, width, -1)
        return self.proj(attn_output), attn_weights

    def _decomposed_rel_pos(self, query, height, width) -> tuple[torch.Tensor, torch.Tensor]:
        """The relative-position bias of each query towards each key row and key column, as stock SAM computes it:
        (batch_size, nHead, height, width, height) and (batch_size, nHead, height, width, width)."""
        batch_size, num_heads, _, head_dim = query.shape
        rel_h_table = self.get_rel_pos(height, height, self.rel_pos_h)  # (height, height, head_dim)
        rel_w_table = self.get_rel_pos(width, width, self.rel_pos_w)  # (width, width, head_dim)
        grid_query = query.reshape(batch_size, num_heads, height, width, head_dim)
        # einsum returns them permuted in memory; made contiguous (they are small), the mask chunks summed from them
        # come out contiguous too, so flattening those for SDPA costs no copy.
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table).contiguous()
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table).contiguous()
        return rel_h, rel_w


def split_qkv_state_dict(state_dict: dict) -> dict:
    """Stock SAM state dict (fused `attn.qkv`) -> split (`attn.q`, `attn.k`, `attn.v`); other keys are kept."""
    split = {}
    for name, tensor in state_dict.items():
        if ".attn.qkv." in name:
            for projection, part in zip(_PROJECTIONS, tensor.chunk(3, dim=0)):
                split[name.replace(".attn.qkv.", f".attn.{projection}.")] = part.clone()
        else:
            split[name] = tensor
    return split


def fuse_qkv_state_dict(state_dict: dict) -> dict:
    """Split state dict -> stock SAM (fused `attn.qkv`), the inverse of `split_qkv_state_dict`."""
    fused = {}
    for name, tensor in state_dict.items():
        if ".attn.q." in name:
            parts = [state_dict[name.replace(".attn.q.", f".attn.{projection}.")] for projection in _PROJECTIONS]
            fused[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts, dim=0)
        elif ".attn.k." not in name and ".attn.v." not in name:
            fused[name] = tensor
    return fused


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


def _check_loading_info(loading_info: dict, source) -> None:
    """Turn transformers' missing/unexpected-key warnings into errors: no weight may stay randomly initialised."""
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    mismatched = sorted(str(item) for item in loading_info.get("mismatched_keys", []))
    if any(".attn.qkv." in name for name in unexpected):
        raise ValueError(
            f"{source} is a stock SAM checkpoint with fused `qkv` weights. Convert it explicitly with "
            f"`SamSplitModel.from_sam({str(source)!r})` (or `push.py --source ...`); loading it as a split model "
            "would leave q/k/v randomly initialised."
        )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not match SamSplitModel: missing weights {missing[:8]}, unexpected weights "
            f"{unexpected[:8]}, mismatched shapes {mismatched[:8]} ({len(missing)} missing, {len(unexpected)} "
            "unexpected in all). Refusing to keep randomly initialised weights."
        )


def _sam_config_kwargs(config: SamConfig) -> dict:
    """The sizes of `config` as keyword arguments for another SAM config class."""
    exclude = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path"}
    return {name: value for name, value in config.to_dict().items() if name not in exclude}


def _build_and_load(model_class, config, state_dict: dict):
    """Instantiate `model_class(config)` without initialising weights, then load `state_dict` strictly."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()  # re-share the positional embedding that `assign=True` gave each of its two owners
    return model.eval()


class SamSplitModel(CheckpointingMixin, SamModel):
    """`SamModel` whose vision attention blocks have separate `q`, `k`, `v` linears (see `SamSplitVisionAttention`).

    Everything else (prompt encoder, mask decoder, `forward`, `get_image_embeddings`, ...) is `SamModel`'s.
    """

    config_class = SamSplitConfig

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
        `forward` override: `forward` stays SamModel's, whatever arguments transformers gives it.)"""
        inputs = _SAM_FORWARD.bind_partial(model, *args, **kwargs).arguments
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
            _check_shape("pixel_values", pixel_values, (None, vision.num_channels, vision.image_size, vision.image_size))
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
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, except that a missing, unexpected or mis-shaped weight is an error.

        A stock (fused `qkv`) SAM checkpoint is refused with a pointer to `from_sam`, which converts it.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        _check_loading_info(loading_info, pretrained_model_name_or_path)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def from_sam(cls, sam: "SamModel | str | os.PathLike", **from_pretrained_kwargs) -> "SamSplitModel":
        """Convert a stock `SamModel`: an instance, a local checkpoint folder or a Hub id (then loaded with
        `SamModel.from_pretrained(sam, **from_pretrained_kwargs)`, e.g. `revision=...`, `dtype=...`).

        The fused `qkv` rows are split in order (q, k, v), weights and biases alike; every other weight is shared as is.
        """
        if isinstance(sam, SamSplitModel):
            raise TypeError("from_sam() expects a stock SamModel, got a SamSplitModel (it is already split).")
        if not isinstance(sam, SamModel):
            if not isinstance(sam, (str, os.PathLike)):
                raise TypeError(f"from_sam() expects a SamModel, a folder or a Hub id, got {type(sam).__name__}.")
            sam = load_stock_sam(sam, **from_pretrained_kwargs)
        elif from_pretrained_kwargs:
            raise TypeError(f"from_sam() got loading arguments {sorted(from_pretrained_kwargs)} with a loaded model.")
        config = SamSplitConfig(**_sam_config_kwargs(sam.config))
        config._attn_implementation = sam.config._attn_implementation
        model = _build_and_load(cls, config, split_qkv_state_dict(sam.state_dict()))
        model.name_or_path = sam.name_or_path
        return model

    def to_sam(self) -> SamModel:
        """A stock `SamModel` with fused `qkv` and exactly these weights, usable without remote code."""
        config = SamConfig(**_sam_config_kwargs(self.config))
        config._attn_implementation = self.config._attn_implementation
        return _build_and_load(SamModel, config, fuse_qkv_state_dict(self.state_dict()))


def load_stock_sam(name_or_path, **from_pretrained_kwargs) -> SamModel:
    """`SamModel.from_pretrained`, refusing non-SAM checkpoints and incomplete ones instead of warning."""
    config_dict, _ = SamConfig.get_config_dict(name_or_path, **from_pretrained_kwargs)
    model_type = config_dict.get("model_type")
    if model_type != "sam":
        hint = " It is already split: load it with SamSplitModel.from_pretrained." if model_type == "sam_split" else ""
        raise ValueError(f"{name_or_path} is not a stock SAM checkpoint (model_type={model_type!r}, expected 'sam').{hint}")
    sam, loading_info = SamModel.from_pretrained(name_or_path, output_loading_info=True, **from_pretrained_kwargs)
    if loading_info["missing_keys"] or loading_info["unexpected_keys"]:
        raise ValueError(
            f"{name_or_path} is an incomplete SAM checkpoint: missing {sorted(loading_info['missing_keys'])[:8]}, "
            f"unexpected {sorted(loading_info['unexpected_keys'])[:8]}."
        )
    return sam


# `save_pretrained` copies both code files next to the weights and writes `auto_map` (see configuration_sam_split).
SamSplitConfig.register_for_auto_class()
SamSplitModel.register_for_auto_class("AutoModel")

__all__ = ["SamSplitModel", "SamSplitVisionAttention", "load_stock_sam", "split_qkv_state_dict", "fuse_qkv_state_dict"]
