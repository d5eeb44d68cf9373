"""The attention kernels of SamSplitModel's vision encoder, and the policy that picks one per call.

Every kernel computes `softmax(scale * q @ k^T + bias) @ v` with SAM's decomposed relative-position bias
`bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)]` (query i, key j), exactly up to float rounding, without stock SAM's
dense `(batch_size, nHead, HW, HW)` mask for a whole batch:

- "chunked" (`chunked_attention`): SDPA gets the bias as mask one chunk of at most `mask_numel` values at a time,
  forward and backward (custom ops: one graph node each under `torch.compile`). With CPU-cache-sized chunks this is
  the fastest CPU path; with chunks of one image's bias it is stock's computation at a fraction of its memory.
- "folded" (`folded_attention`): the bias folded into the dot product, so SDPA runs without a mask on its flash kernel,
  forward and backward, dropout included; ~3x the attention FLOPs of a global layer, but the fastest half-precision
  path on a GPU.
- "dense" (`dense_attention`): SDPA with the whole bias as one mask, stock SAM's computation, no custom op. Taken
  only while the model is being exported (`torch.export`, `torch.onnx.export`): the chunked custom op has no ONNX
  translation ("No ONNX function found"), and a graph cannot keep a Python chunk loop short; the dense graph is the
  one that stock SAM exports, and onnxruntime runs it equal to PyTorch (export_onnx.py verifies every export).
- `eager_attention`: the textbook computation, returning the attention weights (`attn_implementation="eager"`).

`choose_kernel` is the policy: a pure function of what is known at call time, chosen from measurements (README,
benchmarks). `SAM_SPLIT_ATTENTION=chunked|folded` in the environment overrides it, to compare or bisect;
`SAM_SPLIT_CPU_MASK_MIB` sets the CPU chunk size (`benchmarks/bench_chunks.py` measures it).
Only torch is imported (and `split_qkv.py`, for the one-GEMM q/k/v projection): this file travels to the Hub with the
model code.
"""

import itertools
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .split_qkv import project_qkv


# Most bias values per SDPA call on a CPU: 4 MiB in fp32, the fastest on a quiet 2-core machine; beside other busy
# processes fewer, larger calls win, and SAM_SPLIT_CPU_MASK_MIB=16 chooses those (measurements: benchmarks/README.md,
# "CPU chunk size").
def _cpu_mask_numel(setting: str | None) -> int:
    try:
        mib = float(setting or 4)
    except ValueError:
        mib = 0.0
    if not 0 < mib < 2**20:  # also refuses nan and inf
        raise ValueError(f"SAM_SPLIT_CPU_MASK_MIB={setting!r}: expected a positive number of MiB (default 4).")
    return max(1, int(mib * 2**18))  # fp32 values


CPU_MASK_NUMEL = _cpu_mask_numel(os.environ.get("SAM_SPLIT_CPU_MASK_MIB"))
# ... and on other devices: one vit-base image's global-layer bias (12 x 4096 x 4096) per call, so a GPU runs a few
# large kernels (thousands of small ones were 6-14x slower than stock on an H200) with 1/batch_size of stock's mask.
DEVICE_MASK_NUMEL = 12 * 4096 * 4096
# Attention over at most this many tokens (SAM's 14x14 windows: 196) is cheap enough with the bias as mask.
SMALL_ATTENTION_TOKENS = 1024
KERNELS = ("chunked", "folded")  # what SAM_SPLIT_ATTENTION may force; "dense" is for exports only
FORCED_KERNEL = os.environ.get("SAM_SPLIT_ATTENTION") or None


@dataclass(frozen=True)
class AttentionPlan:
    """Which kernel runs, and for "chunked" the most bias values one SDPA call gets."""

    kernel: str
    mask_numel: int = 0


def choose_kernel(
    device_type: str, dtype: torch.dtype, needs_grad: bool, dropout: float, tokens: int, forced: str | None = None,
    exporting: bool = False,
) -> AttentionPlan:
    """The kernel for one attention call over `tokens` tokens per window (or image, in a global layer).

    - Exporting a graph (`exporting`, see `attention`): dense, whatever else holds (SAM_SPLIT_ATTENTION included): the
      graph must hold standard operators only, and dense is stock SAM's own graph.
    - Attention dropout: folded, the only kernel that draws it (the chunked backward recomputes the probabilities).
    - CPU: chunked in cache-sized chunks, forward and backward (measured faster than stock's single mask, and the
      chunked backward keeps training off SDPA's math kernel).
    - CUDA, fp16/bf16, training or large attention: folded, on the flash kernel (measured on an H200 about twice as
      fast as stock's mask, forward and backward: benchmarks/README.md, "GPU").
    - Anything else (CUDA fp32, which has no flash kernel for the folded 192-wide heads; half-precision inference over
      small windows; other devices): chunked, one image's bias per call: stock's FLOPs and kernels, bounded memory.
    """
    forced = forced if forced is not None else FORCED_KERNEL
    if forced is not None and forced not in KERNELS:
        raise ValueError(f"SAM_SPLIT_ATTENTION={forced!r}: expected one of {', '.join(KERNELS)} (or unset for auto).")
    if exporting:
        return AttentionPlan("dense")
    if dropout > 0:
        if forced == "chunked":
            raise ValueError("SAM_SPLIT_ATTENTION=chunked cannot draw attention dropout: unset it or use 'folded'.")
        return AttentionPlan("folded")
    mask_numel = CPU_MASK_NUMEL if device_type == "cpu" else DEVICE_MASK_NUMEL
    if forced is not None:
        return AttentionPlan(forced, mask_numel if forced == "chunked" else 0)
    half = dtype in (torch.float16, torch.bfloat16)
    if device_type == "cuda" and half and (needs_grad or tokens > SMALL_ATTENTION_TOKENS):
        return AttentionPlan("folded")
    return AttentionPlan("chunked", mask_numel)


def attention(query, key, value, rel_h, rel_w, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """SAM vision attention with the kernel `choose_kernel` picks.

    query, key, value: (batch_size, nHead, height * width, head_dim); rel_h: (batch_size, nHead, height, width,
    height) and rel_w: (batch_size, nHead, height, width, width), the bias per query and key row / key column, or both
    None (no relative positions). Returns (batch_size, nHead, height * width, head_dim).
    """
    if rel_h is None:
        return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scale)
    tensors = (query, key, value, rel_h, rel_w)
    needs_grad = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)
    plan = choose_kernel(query.device.type, query.dtype, needs_grad, dropout, query.shape[-2], exporting=_exporting())
    if plan.kernel == "dense":
        return dense_attention(*tensors, scale, dropout)
    if plan.kernel == "folded":
        return folded_attention(*tensors, scale, dropout)
    batch_size, num_heads, seq_len, _ = query.shape
    if not needs_grad and batch_size * num_heads * seq_len**2 <= plan.mask_numel:
        # One chunk holds the whole bias: the chunked op would make the same single SDPA call, plus a custom-op
        # dispatch and a copy into its output (launches that a GPU at batch 1 waits for).
        return dense_attention(*tensors, scale)
    # contiguous: the mask chunks summed from them come out contiguous too, so flattening those for SDPA costs no copy
    return chunked_attention(query, key, value, rel_h.contiguous(), rel_w.contiguous(), scale, plan.mask_numel)


def _exporting() -> bool:
    """Whether a graph exporter is tracing this call: `torch.export` (under `torch.onnx.export(dynamo=True)`, the
    default) or the TorchScript-based `torch.onnx.export(dynamo=False)`. `torch.compile` is not exporting: it keeps
    the custom op as one graph node and runs it."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def dense_attention(query, key, value, rel_h, rel_w, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Stock SAM's SDPA computation: the whole `(batch_size, nHead, HW, HW)` bias as one mask; standard operators
    only, so graph exporters translate it (see `choose_kernel`)."""
    batch_size, num_heads, height, width, _ = rel_h.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch_size, num_heads, height * width, height * width)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=scale)


def eager_attention(query, key, value, rel_h, rel_w, scale: float, dropout: float = 0.0):
    """Stock SAM's eager attention: returns the output and the attention weights `(batch_size * nHead, HW, HW)`."""
    batch_size, num_heads, seq_len, head_dim = query.shape
    # (batch_size * nHead, height * width, head_dim), the layout stock SAM uses and returns its weights in
    query, key, value = (t.reshape(batch_size * num_heads, seq_len, head_dim) for t in (query, key, value))
    attn_weights = (query * scale) @ key.transpose(-2, -1)
    if rel_h is not None:
        bias = rel_h[..., :, None] + rel_w[..., None, :]  # (batch_size, nHead, height, width, height, width)
        attn_weights = attn_weights + bias.reshape_as(attn_weights)
    attn_weights = F.softmax(attn_weights, dtype=torch.float32, dim=-1).to(query.dtype)
    attn_probs = F.dropout(attn_weights, p=dropout, training=dropout > 0)
    attn_output = (attn_probs @ value).reshape(batch_size, num_heads, seq_len, head_dim)
    return attn_output, attn_weights


def folded_attention(query, key, value, rel_h, rel_w, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """The bias folded into the dot product: differentiable on SDPA's flash kernel, dropout included, no mask.

    Appending `rel_h[i]` and `rel_w[i]` to the scaled query and one-hot codes of `row(j)` and `col(j)` to the key makes
    one dot product give `scale * q.k + bias` exactly, so SDPA runs with `scale=1`. Widths are zero-padded to a
    multiple of 8 (flash kernels want it), and the value to the same width (torch's fast CPU kernels want q, k and v
    equally wide); the padding is sliced off again.
    """
    batch_size, num_heads, height, width, _ = rel_h.shape
    seq_len, head_dim = height * width, query.shape[-1]
    folded_width = head_dim + height + width
    padding = -folded_width % 8
    key_codes = _key_codes(height, width, padding, query.dtype, query.device)
    # (batch_size, nHead, height * width, folded_width + padding)
    folded_query = F.pad(torch.cat([query * scale, rel_h.flatten(2, 3), rel_w.flatten(2, 3)], dim=-1), (0, padding))
    folded_key = torch.cat([key, key_codes.expand(batch_size, num_heads, seq_len, -1)], dim=-1)
    padded_value = F.pad(value, (0, folded_width + padding - head_dim))
    attn_output = F.scaled_dot_product_attention(folded_query, folded_key, padded_value, dropout_p=dropout, scale=1.0)
    return attn_output[..., :head_dim]


# (height, width, padding, dtype, device) -> `_key_codes`, built once: five small kernels per global layer less
_KEY_CODES = {}


def _key_codes(height: int, width: int, padding: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(height * width, height + width + padding): the one-hot row and column of each key position, zero-padded."""
    def build():
        rows = torch.eye(height, dtype=dtype, device=device).repeat_interleave(width, dim=0)
        cols = torch.eye(width, dtype=dtype, device=device).repeat(height, 1)
        return F.pad(torch.cat([rows, cols], dim=-1), (0, padding))

    if torch.compiler.is_compiling() or _exporting():  # a graph holds them as constants
        return build()
    key = (height, width, padding, dtype, device)
    if key not in _KEY_CODES:
        with torch.inference_mode(False):  # usable outside inference mode too
            _KEY_CODES[key] = build()
    return _KEY_CODES[key]


# ----------------------------------------------------------------------------------------------- the chunked kernel


def _bias_chunks(batch_size: int, num_heads: int, height: int, width: int, mask_numel: int):
    """Slices `(images, heads, rows, queries)` that cover every attention score once, each with a bias of at most
    `mask_numel` values (or one head's query row, if that is larger). Query rows are split first, then heads, then
    images: a global layer takes one head and a few rows per chunk on a CPU (its keys and values stay in cache from one
    chunk to the next), whole images on a GPU; a windowed layer takes whole windows."""
    seq_len = height * width
    rows_per_chunk = min(height, max(1, mask_numel // (width * seq_len)))
    heads_per_chunk = min(num_heads, max(1, mask_numel // seq_len**2)) if rows_per_chunk == height else 1
    images_per_chunk = max(1, mask_numel // (num_heads * seq_len**2)) if heads_per_chunk == num_heads else 1
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
@torch.library.custom_op(_op_name("chunked_attention"), mutates_args=())
def chunked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
    scale: float, mask_numel: int,
) -> torch.Tensor:
    """Attention with the bias (see `attention` for the shapes) handed to SDPA as mask, one `_bias_chunks` chunk at a
    time: stock SAM's FLOPs on SDPA's fused kernels, without its `(batch_size, nHead, HW, HW)` mask."""
    batch_size, num_heads, height, width, _ = rel_h.shape
    attn_output = _new_attention_output(query)
    for images, heads, rows, queries in _bias_chunks(batch_size, num_heads, height, width, mask_numel):
        attn_output[images, heads, queries] = F.scaled_dot_product_attention(
            query[images, heads, queries], key[images, heads], value[images, heads],
            attn_mask=_chunk_bias(rel_h, rel_w, images, heads, rows), scale=scale,
        )
    return attn_output


@torch.library.custom_op(_op_name("chunked_attention_backward"), mutates_args=())
def chunked_attention_backward(
    grad_output: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rel_h: torch.Tensor,
    rel_w: torch.Tensor, scale: float, mask_numel: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `chunked_attention` for query, key, value, rel_h and rel_w, one chunk of the bias at a time.

    Per chunk it recomputes the attention probabilities and applies the softmax backward: five matrix products of
    head_dim width and no `(HW, HW)` tensor beyond the chunk. (torch's flash kernel cannot back-propagate into a mask;
    given one that needs grad, SDPA falls back to its math kernel and the full mask, as stock SAM does under LoRA on q.)
    """
    # Half-precision inputs are computed in fp32 one chunk at a time, as SDPA's fused CPU kernels accumulate theirs:
    # bf16 scores, probabilities and sums doubled the LoRA-gradient error against stock's (tests/test_fast_paths.py).
    compute = torch.promote_types(query.dtype, torch.float32)
    inputs = (query, key, value, rel_h, rel_w)
    grads = grad_query, grad_key, grad_value, grad_rel_h, grad_rel_w = [
        torch.zeros_like(tensor, dtype=compute) for tensor in inputs
    ]
    batch_size, num_heads, height, width, _ = rel_h.shape
    for images, heads, rows, queries in _bias_chunks(batch_size, num_heads, height, width, mask_numel):
        chunk_query, chunk_key, chunk_value, chunk_grad_output = (
            tensor.to(compute) for tensor in (query[images, heads, queries], key[images, heads], value[images, heads],
                                              grad_output[images, heads, queries])
        )
        # (images, heads, rows * width, height * width): the probabilities, then the gradient of the scores
        scores = torch.matmul(chunk_query, chunk_key.transpose(-2, -1)).mul_(scale)
        probs = torch.softmax(scores.add_(_chunk_bias(rel_h, rel_w, images, heads, rows).to(compute)), dim=-1)
        grad_scores = torch.matmul(chunk_grad_output, chunk_value.transpose(-2, -1))
        grad_scores = grad_scores.sub_((probs * grad_scores).sum(-1, keepdim=True)).mul_(probs)
        grad_query[images, heads, queries] = torch.matmul(grad_scores, chunk_key).mul_(scale)
        grad_key[images, heads] += torch.matmul(grad_scores.transpose(-2, -1), chunk_query).mul_(scale)
        grad_value[images, heads] += torch.matmul(probs.transpose(-2, -1), chunk_grad_output)
        # the bias gradient, summed over key columns (rel_h) and over key rows (rel_w)
        grad_scores = grad_scores.unflatten(2, (-1, width)).unflatten(-1, (height, width))
        grad_rel_h[images, heads, rows] = grad_scores.sum(-1)
        grad_rel_w[images, heads, rows] = grad_scores.sum(-2)
    return tuple(grad.to(tensor.dtype) for grad, tensor in zip(grads, inputs))


@chunked_attention.register_fake
def _chunked_attention_shape(query, key, value, rel_h, rel_w, scale, mask_numel):
    return _new_attention_output(query)


@chunked_attention_backward.register_fake
def _chunked_attention_backward_shapes(grad_output, query, key, value, rel_h, rel_w, scale, mask_numel):
    return tuple(torch.empty_like(tensor) for tensor in (query, key, value, rel_h, rel_w))


def _save_for_backward(ctx, inputs, output):
    *tensors, ctx.scale, ctx.mask_numel = inputs
    ctx.save_for_backward(*tensors)


def _chunked_attention_grads(ctx, grad_output):
    grads = chunked_attention_backward(grad_output, *ctx.saved_tensors, ctx.scale, ctx.mask_numel)
    return *grads, None, None  # no gradient for scale and mask_numel


chunked_attention.register_autograd(_chunked_attention_grads, setup_context=_save_for_backward)


# ------------------------------------------------------------------------------------- the split attention module


class SplitRelPosAttentionMixin:
    """The body of a split-q/k/v SAM vision attention, shared by the SAM and SAM-HQ twins (same relative positions).

    Mixed in before a stock SAM-style vision attention class (`SamVisionAttention`, `SamHQVisionAttention`): that class
    keeps its relative-position tables and `get_rel_pos` helper, and transformers keeps recording its attention
    weights (`output_attentions`) by it; the fused `qkv` Linear is replaced by `q`, `k`, `v`.

    The implementation is read from the config at every call, so `model.set_attn_implementation()` takes effect:
    - `"eager"`: the stock computation, returning the attention weights.
    - anything else: `attention`, which picks a kernel per device, dtype and grad mode that never holds stock's
      `(batch_size, nHead, HW, HW)` bias mask for a whole batch.
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
        # each (batch_size, nHead, height * width, head_dim), from one GEMM (`project_qkv`)
        query, key, value = (self._heads(projection) for projection in project_qkv(self, hidden_states))
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
        rel_h_table = self._rel_pos_table(height, self.rel_pos_h)  # (height, height, head_dim)
        rel_w_table = self._rel_pos_table(width, self.rel_pos_w)  # (width, width, head_dim)
        grid_query = query.reshape(batch_size, num_heads, height, width, head_dim)
        # einsum returns them permuted in memory: the chunked kernel makes them contiguous (`attention`)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table)
        return rel_h, rel_w

    def _rel_pos_table(self, size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        """Stock's `get_rel_pos(size, size, rel_pos)` (the table row of each query and key position), the same values
        from fewer kernels where the table already has `2 * size - 1` rows: stock's linear interpolation to the same
        length returns them unchanged, and its index, built on the host at every call (on a GPU a host-to-device copy
        per call), is built once per size and device."""
        if rel_pos.shape[0] != 2 * size - 1 or torch.compiler.is_compiling() or _exporting():
            return self.get_rel_pos(size, size, rel_pos)
        index = _REL_POS_INDEX.get((size, rel_pos.device))
        if index is None:
            with torch.inference_mode(False):
                positions = torch.arange(size, device=rel_pos.device)
                index = _REL_POS_INDEX[size, rel_pos.device] = positions[:, None] - positions[None, :] + (size - 1)
        return rel_pos[index]


# (size, device) -> (size, size) index of the relative-position table row of each query and key position
_REL_POS_INDEX = {}


__all__ = [
    "AttentionPlan", "SplitRelPosAttentionMixin", "attention", "choose_kernel", "chunked_attention", "dense_attention",
    "eager_attention",
    "folded_attention",
]
