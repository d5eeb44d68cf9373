"""What every split-q/k/v twin shares (SAM, SAM-HQ, SAM 2): the state-dict split and fuse, strict loading, the
conversion from and to the stock model, and the one-GEMM q/k/v projection (`project_qkv`).

A twin is its stock model but for the vision attention, whose fused `attn.qkv` Linear (rows q, k, v) becomes three
Linears `attn.q`, `attn.k`, `attn.v`. Nothing else differs, so converting is splitting (or fusing) those rows, and
every other weight must match one to one: a missing, unexpected or mis-shaped key is an error, never a warning.

Published with every twin's repository: it imports only torch and transformers (transformers' remote-code loader
checks every import statement in the file).
"""

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

PROJECTIONS = ("q", "k", "v")
_FUSED = ".attn.qkv."
# Config entries that name a model rather than describe its sizes: dropped when a config changes class.
_NOT_SIZES = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path"}
# SAM_SPLIT_FUSE_LORA_A=1: the LoRA A matrices of q and v in one GEMM too (see `project_qkv`); off unless measured.
FUSE_LORA_A = os.environ.get("SAM_SPLIT_FUSE_LORA_A", "0") == "1"


def split_qkv_state_dict(state_dict: dict) -> dict:
    """Stock state dict (fused `attn.qkv`) -> split (`attn.q`, `attn.k`, `attn.v`); other keys are kept."""
    split = {}
    for name, tensor in state_dict.items():
        if _FUSED in name:
            for projection, part in zip(PROJECTIONS, tensor.chunk(3, dim=0)):
                split[name.replace(_FUSED, f".attn.{projection}.")] = part.clone()
        else:
            split[name] = tensor
    return split


def fuse_qkv_state_dict(state_dict: dict) -> dict:
    """Split state dict -> stock (fused `attn.qkv`), the inverse of `split_qkv_state_dict`."""
    fused = {}
    for name, tensor in state_dict.items():
        if ".attn.q." in name:
            parts = [state_dict[name.replace(".attn.q.", f".attn.{projection}.")] for projection in PROJECTIONS]
            fused[name.replace(".attn.q.", _FUSED)] = torch.cat(parts, dim=0)
        elif ".attn.k." not in name and ".attn.v." not in name:
            fused[name] = tensor
    return fused


def config_sizes(config) -> dict:
    """The sizes of `config` as keyword arguments for another config class of the same model (stock <-> twin)."""
    return {name: value for name, value in config.to_dict().items() if name not in _NOT_SIZES}


def build_and_load(model_class, config, state_dict: dict, buffers_from: nn.Module | None = None):
    """Instantiate `model_class(config)` without initialising weights, then load `state_dict` strictly.

    Buffers that are no part of a state dict (non-persistent: SAM 2 video's rotary frequencies) are computed at
    construction, so built on the meta device they hold no data: they are copied from `buffers_from`, the model
    converted from, by name (the conversion changes no buffer's name). One left without data is an error."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()  # re-share weights that `assign=True` gave each of their owners (SAM's positional embedding)
    sources = dict(buffers_from.named_buffers()) if buffers_from is not None else {}
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            if name not in sources or sources[name].is_meta:
                raise ValueError(f"{model_class.__name__}: the buffer {name} is not in the state dict and has no "
                                 "source to copy it from")
            owner, _, attribute = name.rpartition(".")
            model.get_submodule(owner)._buffers[attribute] = sources[name].clone()
    return model.eval()


def check_loading_info(loading_info: dict, source, twin_name: str, stock_name: str, conversion: str,
                       strict: bool = True) -> None:
    """Turn transformers' missing/unexpected/mis-shaped-key warnings into errors: no weight may stay randomly
    initialised. A stock checkpoint (fused `qkv`) gets a pointer to the conversion (`conversion`, e.g. "from_sam"),
    also when not `strict` (then only that is checked: the caller reads the report itself)."""
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    mismatched = sorted(str(item) for item in loading_info.get("mismatched_keys", []))
    if any(_FUSED in name for name in unexpected):
        raise ValueError(
            f"{source} is a stock {stock_name} checkpoint with fused `qkv` weights. Convert it explicitly with "
            f"`{twin_name}.{conversion}({str(source)!r})` (or `push.py --source ...`); loading it as a split model "
            "would leave q/k/v randomly initialised."
        )
    if strict and (missing or unexpected or mismatched):
        raise ValueError(
            f"{source} does not match {twin_name}: missing weights {missing[:8]}, unexpected weights "
            f"{unexpected[:8]}, mismatched shapes {mismatched[:8]} ({len(missing)} missing, {len(unexpected)} "
            "unexpected in all). Refusing to keep randomly initialised weights."
        )


def load_stock(twin, name_or_path, **from_pretrained_kwargs):
    """Load a complete stock checkpoint for `twin` (a `SplitTwinMixin` class) as `twin.stock_class`, strictly.
    Returns `(model, left_out_weights)`.

    `twin.stock_model_types` maps each accepted config `model_type` to `(class that loads it, function turning that
    class's config dict into a stock config)`, the function None when the class is the stock class itself. A larger
    model that holds the stock one (SAM 2 *video*, which adds memory modules to the SAM 2 image model) is loaded whole
    and strictly; its weights that the stock model does not have are left out and returned sorted. Any missing,
    unexpected or mis-shaped weight is a `ValueError`.
    """
    stock_class, stock_name = twin.stock_class, twin.stock_name
    config_dict, _ = stock_class.config_class.get_config_dict(name_or_path, **from_pretrained_kwargs)
    model_type = config_dict.get("model_type")
    if model_type not in twin.stock_model_types:
        hint = (f" It is already split: load it with {twin.__name__}.from_pretrained."
                if model_type == twin.config_class.model_type else "")
        expected = " or ".join(map(repr, twin.stock_model_types))
        raise ValueError(f"{name_or_path} is not a stock {stock_name} checkpoint (model_type={model_type!r}, "
                         f"expected {expected}).{hint}")
    load_class, _ = twin.stock_model_types[model_type]
    model, loading_info = load_class.from_pretrained(name_or_path, output_loading_info=True, **from_pretrained_kwargs)
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    mismatched = sorted(str(item) for item in loading_info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(f"{name_or_path} is an incomplete {stock_name} checkpoint: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, mismatched shapes {mismatched[:8]}.")
    return stock_part(twin, model, name_or_path)


def stock_part(twin, model, source=None):
    """`(stock model, weights left out)`: `model` itself when it is `twin.stock_class`'s, else the stock model it
    holds (an instance of a larger class in `twin.stock_model_types`: SAM 2 video holds SAM 2's image model), built
    from its weights, the rest of them returned sorted. `source` names the checkpoint in messages."""
    stock_class, stock_name = twin.stock_class, twin.stock_name
    stock_config = next((to_config for load_class, to_config in twin.stock_model_types.values()
                         if type(model) is load_class), None)
    if type(model) is stock_class or stock_config is None:
        if not isinstance(model, stock_class):
            raise TypeError(f"expected a {' or '.join(cls.__name__ for cls, _ in twin.stock_model_types.values())}, "
                            f"got {type(model).__name__}")
        return model.eval(), []
    source = model.name_or_path if source is None else source
    config = stock_config(model.config.to_dict())
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        wanted = set(stock_class(config).state_dict())
    weights = model.state_dict()
    if wanted - set(weights):
        lacking = sorted(wanted - set(weights))
        raise ValueError(f"{source} lacks weights of the {stock_name} model: {lacking[:8]}.")
    stock = build_and_load(stock_class, config, {name: weights[name] for name in wanted}, buffers_from=model)
    stock.name_or_path = model.name_or_path
    return stock, sorted(set(weights) - wanted)


# ------------------------------------------------------------------------------------ one GEMM for q, k and v

# PEFT's LoRA `Linear`, recognised by its class's module and name and the attributes its forward reads: this file is
# published with the model and imports only torch and transformers.
_LORA_LINEAR = ("peft.tuners.lora.layer", "Linear")
_LORA_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "merged",
                    "merged_adapters", "disable_adapters", "fan_in_fan_out")
_FALLBACKS_LOGGED = set()


def _is_lora_linear(layer: nn.Module) -> bool:
    kind = type(layer)
    return (kind.__module__, kind.__qualname__) == _LORA_LINEAR and all(
        hasattr(layer, name) for name in _LORA_ATTRIBUTES
    )


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` would run more than its class's forward (hooks, or a forward set on the instance, as
    accelerate's offloading does), which one fused GEMM would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _active_lora(layer: nn.Module) -> tuple[str | None, str | None]:
    """`(adapter, None)`: the one LoRA adapter whose `lora_B(lora_A(dropout(x))) * scaling` PEFT's forward adds to
    `base_layer(x)` (None: it adds nothing: adapters disabled or merged); `(None, reason)` where `project_qkv` cannot
    reproduce that forward exactly."""
    if layer.fan_in_fan_out:
        return None, "a LoRA layer with fan_in_fan_out"
    if layer.disable_adapters:
        # PEFT unmerges a merged adapter in forward before it runs the base layer: left to PEFT
        return (None, "a disabled adapter that is still merged") if layer.merged else (None, None)
    if layer.merged:
        return None, None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) > 1:
        return None, "several active LoRA adapters"
    if not active:
        return None, None
    adapter = active[0]
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter):
        return None, "DoRA or another LoRA variant"
    if any(_hooked(modules[adapter]) for modules in (layer.lora_A, layer.lora_B)):
        return None, "hooks on a LoRA matrix"
    return adapter, None


def _fusion_plan(layers) -> tuple[list | None, str | None]:
    """`([(base Linear, LoRA layer or None, adapter or None)] * 3, None)` when `project_qkv` can compute `layers` (q, k,
    v) as one GEMM plus their LoRA terms, exactly as their own forwards would; else `(None, why not)`."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return None, "a graph is being exported (it keeps three projections, as before)"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return None, "global module hooks are registered"
    plan = []
    for layer in layers:
        lora, adapter = None, None
        if _is_lora_linear(layer):
            lora, base = layer, layer.base_layer
            adapter, reason = _active_lora(layer)
            if reason:
                return None, reason
        elif type(layer) is nn.Linear:
            base = layer
        else:
            return None, f"q, k or v is a {type(layer).__name__}, neither nn.Linear nor PEFT's LoRA Linear"
        if type(base) is not nn.Linear or _hooked(base) or _hooked(layer):
            return None, "q, k or v is hooked or its base layer is not an nn.Linear"
        trainable = base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
        if trainable and torch.is_grad_enabled():
            return None, "q, k or v weights require grad (the fused weight would not pass gradients to them)"
        plan.append((base, lora, adapter))
    if len({(base.weight.dtype, base.weight.device, base.in_features, base.bias is None) for base, _, _ in plan}) > 1:
        return None, "q, k and v differ in dtype, device, input width or bias"
    return plan, None


def _frozen_tensors(plan) -> list:
    return [tensor for base, _, _ in plan for tensor in (base.weight, base.bias) if tensor is not None]


def _merged_state(plan) -> tuple:
    """The PEFT adapters merged into each base weight, with the version of their LoRA weights (PEFT merges and unmerges
    through `weight.data`, which no version counter sees; what it merges is what those weights held)."""
    return tuple(
        tuple((name, *((weight.data_ptr(), weight._version) for weight in (lora.lora_A[name].weight,
                                                                           lora.lora_B[name].weight)))
              for name in lora.merged_adapters if name in lora.lora_A) if lora is not None else ()
        for _, lora, _ in plan
    )


def _cache_is_current(cache, plan) -> bool:
    """Whether the cached concatenation still holds the frozen q/k/v weights: the same storage (the cache keeps it
    alive, so no new tensor can take its address), not modified in place since (`_version`: `copy_`, `add_` under
    `no_grad`, `load_state_dict`), the same dtype and device (`.to()` makes new tensors), and the same PEFT adapters
    merged into it (`_merged_state`)."""
    aliases, versions, merged = cache[:3]
    tensors = _frozen_tensors(plan)
    return (
        len(tensors) == len(aliases)
        and all(tensor.data_ptr() == alias.data_ptr() and tensor.dtype == alias.dtype and tensor.device == alias.device
                and tensor.shape == alias.shape and tensor._version == version
                for tensor, alias, version in zip(tensors, aliases, versions))
        and merged == _merged_state(plan)
    )


def _fused_weight(module: nn.Module, plan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(cat(Wq, Wk, Wv), cat(bq, bk, bv) or None)`.

    Cached on `module` while PEFT wraps q, k or v, until those weights change (see `_cache_is_current`). Plain Linears
    are concatenated at every call (one copy, still one launch fewer than three GEMMs): nothing would tell a cache
    that PEFT merged an adapter into them through `weight.data` and unloaded it (`merge_and_unload`). Under
    `torch.compile` too, which sees the concatenation of constants."""
    bases = [base for base, _, _ in plan]
    wrapped = any(lora is not None for _, lora, _ in plan)
    if not wrapped or torch.compiler.is_compiling() or any(tensor.is_inference() for tensor in _frozen_tensors(plan)):
        if not torch.compiler.is_compiling():
            module.__dict__.pop("_fused_qkv_cache", None)  # e.g. after merge_and_unload: the old weights' memory
        bias = None if bases[0].bias is None else torch.cat([base.bias for base in bases])
        return torch.cat([base.weight for base in bases]), bias
    cache = module.__dict__.get("_fused_qkv_cache")
    if cache is None or not _cache_is_current(cache, plan):
        with torch.inference_mode(False), torch.no_grad():
            tensors = _frozen_tensors(plan)
            weight = torch.cat([base.weight for base in bases])
            bias = None if bases[0].bias is None else torch.cat([base.bias for base in bases])
            cache = ([tensor.detach() for tensor in tensors], [tensor._version for tensor in tensors],
                     _merged_state(plan), weight, bias)
        module.__dict__["_fused_qkv_cache"] = cache
    return cache[3], cache[4]


def _lora_input(lora: nn.Module, adapter: str, hidden_states: torch.Tensor) -> torch.Tensor:
    """The input PEFT's LoRA forward gives `lora_A` before dropout: cast to lora_A's dtype (`_cast_input_dtype`, which
    can be switched off; older PEFT casts with `.to`)."""
    dtype = lora.lora_A[adapter].weight.dtype
    if hasattr(lora, "_cast_input_dtype"):
        return lora._cast_input_dtype(hidden_states, dtype)
    return hidden_states.to(dtype)


def _lora_terms(plan, hidden_states: torch.Tensor) -> dict:
    """{index: `lora_B(lora_A(dropout(x))) * scaling`} of each adapted projection, PEFT's computation. With
    SAM_SPLIT_FUSE_LORA_A=1 and no dropout, the A matrices of all adapted projections run as one GEMM."""
    adapted = [(index, lora, adapter) for index, (_, lora, adapter) in enumerate(plan) if adapter is not None]
    if FUSE_LORA_A and len(adapted) > 1 and all(
        type(lora.lora_dropout[adapter]) is nn.Identity and type(lora.lora_A[adapter]) is nn.Linear
        and lora.lora_A[adapter].bias is None for _, lora, adapter in adapted
    ) and len({lora.lora_A[adapter].weight.dtype for _, lora, adapter in adapted}) == 1:
        _, lora, adapter = adapted[0]
        lora_input = _lora_input(lora, adapter, hidden_states)
        weights = [lora.lora_A[adapter].weight for _, lora, adapter in adapted]
        down = F.linear(lora_input, torch.cat(weights)).split([weight.shape[0] for weight in weights], dim=-1)
        return {index: lora.lora_B[adapter](part) * lora.scaling[adapter]
                for (index, lora, adapter), part in zip(adapted, down)}
    terms = {}
    for index, lora, adapter in adapted:
        lora_input = lora.lora_dropout[adapter](_lora_input(lora, adapter, hidden_states))
        terms[index] = lora.lora_B[adapter](lora.lora_A[adapter](lora_input)) * lora.scaling[adapter]
    return terms


def project_qkv(module: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(module.q(x), module.k(x), module.v(x))`, computed as one GEMM `F.linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv))`
    split in three, the way stock's fused `qkv` computes it; PEFT LoRA on any of them adds its
    `lora_B(lora_A(dropout(x))) * scaling` to its part, as PEFT's LoRA `Linear.forward` does (merged, disabled and
    unmerged adapters alike). `q`, `k` and `v` stay separate modules, so PEFT targets, merges and saves them as ever.

    Where that would not be exactly their own forwards (DoRA and other variants, adapters other than LoRA, several
    active adapters, q/k/v weights that require grad while grad is enabled, hooks, graph export, anything not
    recognised), the three modules are called instead, and a debug log says why, once per reason.
    """
    layers = (module.q, module.k, module.v)
    plan, reason = _fusion_plan(layers)
    if plan is None:
        if reason not in _FALLBACKS_LOGGED:
            _FALLBACKS_LOGGED.add(reason)
            logger.debug(f"q/k/v projected by three calls: {reason}.")
        return tuple(layer(hidden_states) for layer in layers)
    weight, bias = _fused_weight(module, plan)
    fused = F.linear(hidden_states, weight, bias)
    sizes = [base.out_features for base, _, _ in plan]
    for index, term in _lora_terms(plan, hidden_states).items():
        # Into the fused output, in place, so that q, k and v stay views of one tensor as stock's are of its qkv
        # output: the backward then keeps that one tensor, not it and new copies of q and v besides (hiera-tiny,
        # LoRA on q and v, batch 2: 3.98 GB of saved tensors before, 3.28 GB now, stock 3.62 GB). The in-place add
        # computes in the promoted dtype and casts back, as PEFT's `(result + term).to(result.dtype)` does.
        start = sum(sizes[:index])
        fused[..., start:start + sizes[index]] += term
    return tuple(fused.split(sizes, -1))


def describe_left_out(left_out: list) -> str:
    """'160 weights the image model does not use (video memory: mask_downsample, memory_attention, ...)'."""
    modules = sorted({name.split(".")[0] for name in left_out})
    return f"{len(left_out)} weights the image model does not use (video memory: {', '.join(modules)})"


class SplitTwinMixin:
    """The conversion and strict loading of a split twin; mixed into a subclass of the stock model.

    A twin sets `stock_class` (e.g. `SamModel`), `stock_config_class`, `stock_model_types` (see `load_stock`) and
    `stock_name` (for messages).
    """

    stock_class = None
    stock_config_class = None
    stock_model_types: dict = {}
    stock_name = ""
    conversion_name = "from_stock"
    # Every unexpected weight is reported (and then refused), where transformers lets a model say so: stock SAM 2
    # ignores video memory weights silently. (transformers 5 also applies the stock vision sub-models' patterns.)
    _keys_to_ignore_on_load_unexpected = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, except that a missing, unexpected or mis-shaped weight is an error.

        With `output_loading_info=True` it returns `(model, loading_info)` as transformers does, the missing,
        unexpected and mis-shaped weights listed there for the caller to judge instead of raised (a partial checkpoint
        loads, its missing weights randomly initialised). A stock (fused `qkv`) checkpoint is refused either way,
        with a pointer to the conversion (`from_stock`).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        check_loading_info(loading_info, pretrained_model_name_or_path, cls.__name__, cls.stock_name,
                           cls.conversion_name, strict=not output_loading_info)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def load_stock(cls, name_or_path, **from_pretrained_kwargs):
        """`(stock model, weights left out)` from a stock checkpoint folder or Hub id, strictly (see `load_stock`)."""
        return load_stock(cls, name_or_path, **from_pretrained_kwargs)

    @classmethod
    def stock_part(cls, model):
        """`(stock model, weights left out)` of a loaded model of a class in `stock_model_types` (see `stock_part`)."""
        return stock_part(cls, model)

    @classmethod
    def from_stock(cls, stock, **from_pretrained_kwargs):
        """Convert a stock model: an instance, a local checkpoint folder or a Hub id (then loaded strictly with
        `from_pretrained(stock, **from_pretrained_kwargs)`, e.g. `revision=...`, `dtype=...`).

        The fused `qkv` rows are split in order (q, k, v), weights and biases alike; every other weight is shared as
        is. Weights of the checkpoint that the image model does not use (SAM 2 video's memory) are left out with a
        warning that lists them.
        """
        if isinstance(stock, cls):
            raise TypeError(f"{cls.conversion_name}() expects a stock {cls.stock_class.__name__}, got a "
                            f"{cls.__name__} (it is already split).")
        if not isinstance(stock, cls.stock_class):
            if not isinstance(stock, (str, os.PathLike)):
                raise TypeError(f"{cls.conversion_name}() expects a {cls.stock_class.__name__}, a folder or a Hub id, "
                                f"got {type(stock).__name__}.")
            stock, left_out = cls.load_stock(stock, **from_pretrained_kwargs)
            if left_out:
                logger.warning(f"{cls.__name__}: left out {describe_left_out(left_out)}")
        elif from_pretrained_kwargs:
            raise TypeError(f"{cls.conversion_name}() got loading arguments {sorted(from_pretrained_kwargs)} with a "
                            "loaded model.")
        config = cls.config_class(**config_sizes(stock.config))
        config._attn_implementation = stock.config._attn_implementation
        model = build_and_load(cls, config, split_qkv_state_dict(stock.state_dict()), buffers_from=stock)
        model.name_or_path = stock.name_or_path
        return model

    def to_stock(self):
        """The stock model (fused `qkv`) with exactly these weights, usable without remote code."""
        config = self.stock_config_class(**config_sizes(self.config))
        config._attn_implementation = self.config._attn_implementation
        return build_and_load(self.stock_class, config, fuse_qkv_state_dict(self.state_dict()), buffers_from=self)


__all__ = ["SplitTwinMixin", "build_and_load", "check_loading_info", "config_sizes", "describe_left_out",
           "fuse_qkv_state_dict",
           "load_stock", "project_qkv", "split_qkv_state_dict", "stock_part"]
