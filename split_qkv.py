"""What every split-q/k/v twin shares (SAM, SAM-HQ, SAM 2): the state-dict split and fuse, strict loading, and the
conversion from and to the stock model.

A twin is its stock model but for the vision attention, whose fused `attn.qkv` Linear (rows q, k, v) becomes three
Linears `attn.q`, `attn.k`, `attn.v`. Nothing else differs, so converting is splitting (or fusing) those rows, and
every other weight must match one to one: a missing, unexpected or mis-shaped key is an error, never a warning.

Published with every twin's repository: it imports only torch and transformers (transformers' remote-code loader
checks every import statement in the file).
"""

import os

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

PROJECTIONS = ("q", "k", "v")
_FUSED = ".attn.qkv."
# Config entries that name a model rather than describe its sizes: dropped when a config changes class.
_NOT_SIZES = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path"}


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


def build_and_load(model_class, config, state_dict: dict):
    """Instantiate `model_class(config)` without initialising weights, then load `state_dict` strictly."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()  # re-share weights that `assign=True` gave each of their owners (SAM's positional embedding)
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
    load_class, stock_config = twin.stock_model_types[model_type]
    model, loading_info = load_class.from_pretrained(name_or_path, output_loading_info=True, **from_pretrained_kwargs)
    missing, unexpected = sorted(loading_info["missing_keys"]), sorted(loading_info["unexpected_keys"])
    mismatched = sorted(str(item) for item in loading_info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise ValueError(f"{name_or_path} is an incomplete {stock_name} checkpoint: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, mismatched shapes {mismatched[:8]}.")
    if stock_config is None:
        return model.eval(), []
    config = stock_config(model.config.to_dict())
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        wanted = set(stock_class(config).state_dict())
    weights = model.state_dict()
    if wanted - set(weights):
        lacking = sorted(wanted - set(weights))
        raise ValueError(f"{name_or_path} lacks weights of the {stock_name} model: {lacking[:8]}.")
    stock = build_and_load(stock_class, config, {name: weights[name] for name in wanted})
    stock.name_or_path = model.name_or_path
    return stock, sorted(set(weights) - wanted)


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
        model = build_and_load(cls, config, split_qkv_state_dict(stock.state_dict()))
        model.name_or_path = stock.name_or_path
        return model

    def to_stock(self):
        """The stock model (fused `qkv`) with exactly these weights, usable without remote code."""
        config = self.stock_config_class(**config_sizes(self.config))
        config._attn_implementation = self.config._attn_implementation
        return build_and_load(self.stock_class, config, fuse_qkv_state_dict(self.state_dict()))


__all__ = ["SplitTwinMixin", "build_and_load", "check_loading_info", "config_sizes", "describe_left_out",
           "fuse_qkv_state_dict",
           "load_stock", "split_qkv_state_dict"]
