"""SAM with separate `q`, `k`, `v` projections in the vision encoder, so PEFT can put LoRA on `q` and `v` alone.

`SamSplitModel` is transformers' `SamModel` but for one class: every vision attention block holds three `nn.Linear`
named `q`, `k`, `v` instead of one fused `qkv`. Outputs equal `SamModel`'s on the same weights. Stock checkpoints are
converted explicitly (`from_sam` / `to_sam`): transformers 5 loads weights without calling module hooks, so a
`load_state_dict` pre-hook (the recipe this replaces) would leave q/k/v randomly initialised without a word.

Supported: transformers 4.57 and 5.x. Only torch and transformers are imported, as the Hub's remote-code loader demands.
"""

import itertools
import os
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamConfig, SamModel
from transformers.models.sam.modeling_sam import SamVisionAttention
from transformers.utils import logging

from .compat import CheckpointingMixin
from .configuration_sam_split import SamSplitConfig

logger = logging.get_logger(__name__)

_PROJECTIONS = ("q", "k", "v")
# Largest relative-position mask one SDPA call gets (4 MiB in fp32, against stock SAM's 800 MB per image and global
# layer at 1024x1024): small enough to be still in cache when SDPA reads it. Measured per global layer at 1024x1024
# on 2 CPU cores: 0.315 s with these chunks (one head, four query rows), 0.52 s with 64 MiB chunks (all heads),
# 0.306 s for SDPA given a ready full mask.
_MASK_CHUNK_NUMEL = 2**20


def _bias_chunks(batch_size: int, num_heads: int, height: int, width: int):
    """Slices `(images, heads, rows, queries)` that cover every attention score once, each with a bias of at most
    `_MASK_CHUNK_NUMEL` values. Query rows are split first, then heads, then images: a global layer takes one head and
    a few rows per chunk (its keys and values stay in cache from one chunk to the next), a windowed layer whole
    windows."""
    seq_len = height * width
    rows_per_chunk = min(height, max(1, _MASK_CHUNK_NUMEL // (width * seq_len)))
    heads_per_chunk = min(num_heads, max(1, _MASK_CHUNK_NUMEL // seq_len**2)) if rows_per_chunk == height else 1
    images_per_chunk = max(1, _MASK_CHUNK_NUMEL // (num_heads * seq_len**2)) if heads_per_chunk == num_heads else 1
    for image, head, row in itertools.product(
        range(0, batch_size, images_per_chunk), range(0, num_heads, heads_per_chunk), range(0, height, rows_per_chunk)
    ):
        rows = slice(row, row + rows_per_chunk)
        queries = slice(row * width, rows.stop * width)
        yield slice(image, image + images_per_chunk), slice(head, head + heads_per_chunk), rows, queries


def _chunk_bias(rel_h, rel_w, images, heads, rows) -> torch.Tensor:
    """(images, heads, rows * width, height * width): the relative-position bias of one chunk's queries."""
    return (rel_h[images, heads, rows, :, :, None] + rel_w[images, heads, rows, :, None, :]).flatten(2, 3).flatten(3)


def _new_attention_output(query: torch.Tensor) -> torch.Tensor:
    """An uninitialised output for `query` (batch_size, nHead, height * width, head_dim), laid out in memory as
    (batch_size, height * width, nHead, head_dim), so that turning it back into channels is a free view."""
    batch_size, num_heads, seq_len, head_dim = query.shape
    return query.new_empty(batch_size, seq_len, num_heads, head_dim).transpose(1, 2)


def _op_name(stem: str) -> str:
    """`sam_split::<module>_<stem>`: torch registers an op name once per process, and the Hub imports each revision of
    this file as its own module. A number is appended if this very module was executed before (a reload)."""
    stem = re.sub(r"\W", "_", f"{__name__}_{stem}")
    candidates = (stem, *(f"{stem}{number}" for number in range(1, 1000)))
    return "sam_split::" + next(name for name in candidates if not hasattr(torch.ops.sam_split, name))


# Custom ops, so that `torch.compile` sees each as one node instead of unrolling the chunk loops (minutes of compiling).
@torch.library.custom_op(_op_name("rel_pos_attention"), mutates_args=())
def rel_pos_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale * query @ key^T + bias) @ value with SAM's decomposed relative-position bias
    `bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)]`, without ever holding the `(HW, HW)` bias of a whole head.

    query, key, value: (batch_size, nHead, height * width, head_dim); rel_h: (batch_size, nHead, height, width, height)
    and rel_w: (batch_size, nHead, height, width, width), the bias per query and key row / key column. SDPA gets the
    bias as mask one `_bias_chunks` chunk at a time: stock SAM's FLOPs on the flash kernel, without its
    `(batch_size, nHead, HW, HW)` mask, and faster, since each chunk's mask is still in cache when SDPA reads it.
    """
    batch_size, num_heads, height, width, _ = rel_h.shape
    attn_output = _new_attention_output(query)
    for images, heads, rows, queries in _bias_chunks(batch_size, num_heads, height, width):
        attn_output[images, heads, queries] = F.scaled_dot_product_attention(
            query[images, heads, queries], key[images, heads], value[images, heads],
            attn_mask=_chunk_bias(rel_h, rel_w, images, heads, rows), scale=scale,
        )
    return attn_output


@torch.library.custom_op(_op_name("rel_pos_attention_backward"), mutates_args=())
def rel_pos_attention_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor,
    rel_w: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `rel_pos_attention` for query, key, value, rel_h and rel_w, one chunk of the bias at a time.

    Per chunk it recomputes the attention probabilities and applies the softmax backward: five matrix products of
    head_dim width and no `(HW, HW)` tensor. (torch's flash kernel cannot back-propagate into a mask; given one that
    needs grad, SDPA silently falls back to its math kernel and the full mask, as stock SAM does under LoRA on q.)
    """
    grads = grad_query, grad_key, grad_value, grad_rel_h, grad_rel_w = [
        torch.zeros_like(tensor) for tensor in (query, key, value, rel_h, rel_w)
    ]
    batch_size, num_heads, height, width, _ = rel_h.shape
    for images, heads, rows, queries in _bias_chunks(batch_size, num_heads, height, width):
        chunk_query, chunk_key, chunk_value = query[images, heads, queries], key[images, heads], value[images, heads]
        chunk_grad_output = grad_output[images, heads, queries]
        # (images, heads, rows * width, height * width): the probabilities, then the gradient of the scores
        scores = torch.matmul(chunk_query, chunk_key.transpose(-2, -1)).mul_(scale)
        probs = torch.softmax(scores.add_(_chunk_bias(rel_h, rel_w, images, heads, rows)), dim=-1)
        grad_scores = torch.matmul(chunk_grad_output, chunk_value.transpose(-2, -1))
        grad_scores = grad_scores.sub_((probs * grad_scores).sum(-1, keepdim=True)).mul_(probs)
        grad_query[images, heads, queries] = torch.matmul(grad_scores, chunk_key).mul_(scale)
        grad_key[images, heads] += torch.matmul(grad_scores.transpose(-2, -1), chunk_query).mul_(scale)
        grad_value[images, heads] += torch.matmul(probs.transpose(-2, -1), chunk_grad_output)
        # the bias gradient, summed over key columns (rel_h) and over key rows (rel_w)
        grad_scores = grad_scores.unflatten(2, (-1, width)).unflatten(-1, (height, width))
        grad_rel_h[images, heads, rows] = grad_scores.sum(-1)
        grad_rel_w[images, heads, rows] = grad_scores.sum(-2)
    return tuple(grads)


@rel_pos_attention.register_fake
def _rel_pos_attention_shape(query, key, value, rel_h, rel_w, scale):
    return _new_attention_output(query)


@rel_pos_attention_backward.register_fake
def _rel_pos_attention_backward_shapes(grad_output, query, key, value, rel_h, rel_w, scale):
    return tuple(torch.empty_like(tensor) for tensor in (query, key, value, rel_h, rel_w))


def _save_for_backward(ctx, inputs, output):
    *tensors, ctx.scale = inputs
    ctx.save_for_backward(*tensors)


def _rel_pos_attention_grads(ctx, grad_output):
    return *rel_pos_attention_backward(grad_output, *ctx.saved_tensors, ctx.scale), None  # no gradient for scale


rel_pos_attention.register_autograd(_rel_pos_attention_grads, setup_context=_save_for_backward)


class SamSplitVisionAttention(SamVisionAttention):
    """SAM vision attention with decomposed relative positions, computed from separate `q`, `k`, `v` projections.

    It subclasses `SamVisionAttention` for its relative-position helpers and so that transformers still records its
    attention weights (`output_attentions`) and initialises its `rel_pos_h`/`rel_pos_w`.

    The implementation is read from the config at every call, so `model.set_attn_implementation()` takes effect:
    - `"eager"`: the stock computation, returning the attention weights.
    - anything else: SDPA on its fast kernel without materialising the `(height * width, height * width)` bias per
      head (see `_sdpa`).
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

        if self.config._attn_implementation == "eager":
            attn_output, attn_weights = self._eager(query, key, value, height, width)
        else:
            attn_output, attn_weights = self._sdpa(query, key, value, height, width), None

        # (batch_size, nHead, height * width, head_dim) -> (batch_size, height, width, channel)
        attn_output = attn_output.transpose(1, 2).reshape(batch_size, height, width, -1)
        return self.proj(attn_output), attn_weights

    def _eager(self, query, key, value, height, width):
        """Stock SAM attention; returns the output and the weights as `(batch_size * nHead, HW, HW)`."""
        batch_size, num_heads, seq_len, head_dim = query.shape
        # (batch_size * nHead, height * width, head_dim), the layout stock SAM uses and returns its weights in
        query, key, value = (t.reshape(batch_size * num_heads, seq_len, head_dim) for t in (query, key, value))
        attn_weights = (query * self.scale) @ key.transpose(-2, -1)
        if self.use_rel_pos:
            rel_pos = self.get_decomposed_rel_pos(query, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
            attn_weights = attn_weights + rel_pos.reshape_as(attn_weights)
        attn_weights = F.softmax(attn_weights, dtype=torch.float32, dim=-1).to(query.dtype)
        attn_probs = F.dropout(attn_weights, p=self.dropout, training=self.training)
        attn_output = (attn_probs @ value).reshape(batch_size, num_heads, seq_len, head_dim)
        return attn_output, attn_weights

    def _sdpa(self, query, key, value, height, width):
        """SDPA on its fast (flash) kernel, never materialising the full `(HW, HW)` relative-position bias per head.

        The bias of query i and key j is `rel_h[i, row(j)] + rel_w[i, col(j)]`; `rel_pos_attention` computes the
        attention with it, one small chunk of the bias at a time, forward and backward. Training with attention
        dropout folds the bias into q and k instead (`_folded_sdpa`).
        """
        dropout = self.dropout if self.training else 0.0
        if not self.use_rel_pos:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        batch_size, num_heads, _, head_dim = query.shape
        rel_h_table = self.get_rel_pos(height, height, self.rel_pos_h)  # (height, height, head_dim)
        rel_w_table = self.get_rel_pos(width, width, self.rel_pos_w)  # (width, width, head_dim)
        grid_query = query.reshape(batch_size, num_heads, height, width, head_dim)
        # (batch_size, nHead, height, width, height) and (..., width): bias per query and key row / key column.
        # einsum returns them permuted in memory; made contiguous (they are small), the mask chunks `_chunk_bias` sums
        # from them come out contiguous too, so flattening those for SDPA costs no copy.
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table).contiguous()
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table).contiguous()
        if dropout:  # rel_pos_attention's backward recomputes the probabilities: it could not redraw SDPA's dropout
            return self._folded_sdpa(query, key, value, rel_h, rel_w, dropout)
        return rel_pos_attention(query, key, value, rel_h, rel_w, self.scale)

    def _folded_sdpa(self, query, key, value, rel_h, rel_w, dropout):
        """Attention with the relative-position bias folded into the dot product, differentiable on the flash kernel,
        for training with attention dropout (SAM's default is none).

        Appending `rel_h[i]` and `rel_w[i]` to the scaled query and one-hot codes of `row(j)` and `col(j)` to the key
        makes one dot product give `scale * q.k + bias` exactly, so SDPA runs with `scale=1` and no mask. The value is
        zero-padded to the same width because torch's fast CPU kernels want q, k and v equally wide; the padding is
        sliced off again. It costs ~3x the attention FLOPs of global layers.
        """
        batch_size, num_heads, height, width, _ = rel_h.shape
        seq_len, head_dim = height * width, query.shape[-1]
        # (height * width, height + width): one-hot row and column of each key position
        rows = torch.eye(height, dtype=query.dtype, device=query.device).repeat_interleave(width, dim=0)
        cols = torch.eye(width, dtype=query.dtype, device=query.device).repeat(height, 1)
        key_codes = torch.cat([rows, cols], dim=-1).expand(batch_size, num_heads, seq_len, height + width)
        # (batch_size, nHead, height * width, head_dim + height + width)
        folded_query = torch.cat([query * self.scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)], dim=-1)
        folded_key = torch.cat([key, key_codes], dim=-1)
        padded_value = F.pad(value, (0, height + width))
        attn_output = F.scaled_dot_product_attention(folded_query, folded_key, padded_value, dropout_p=dropout, scale=1.0)
        return attn_output[..., :head_dim]


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
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.LongTensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        **kwargs,
    ):
        """`SamModel.forward` (same arguments, same outputs) after checking the shapes of the inputs, so that a wrong
        shape is reported as such instead of failing deep inside the model or broadcasting into a wrong result."""
        self._check_inputs(pixel_values, input_points, input_labels, input_boxes, input_masks, image_embeddings)
        return super().forward(
            pixel_values=pixel_values,
            input_points=input_points,
            input_labels=input_labels,
            input_boxes=input_boxes,
            input_masks=input_masks,
            image_embeddings=image_embeddings,
            multimask_output=multimask_output,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            **kwargs,
        )

    def _check_inputs(self, pixel_values, input_points, input_labels, input_boxes, input_masks, image_embeddings):
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("Pass exactly one of `pixel_values` and `image_embeddings`.")
        if input_labels is not None and input_points is None:
            raise ValueError("`input_labels` were given without `input_points`: labels describe points.")
        vision = self.config.vision_config
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
