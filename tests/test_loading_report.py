"""Loading like transformers where asked: `from_pretrained(..., output_loading_info=True)` returns transformers'
report of a partial checkpoint (missing and unexpected weights) instead of raising; strict loading stays the
default, and a stock fused checkpoint is refused either way."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from sam_testing import random_stock_sam, randomize_, tiny_sam2_config

from sam_split import Sam2SplitModel, SamSplitModel


def twins():
    from transformers import Sam2Model

    torch.manual_seed(0)
    return {"sam": SamSplitModel.from_sam(random_stock_sam()),
            "sam2": Sam2SplitModel.from_stock(randomize_(Sam2Model(tiny_sam2_config())))}


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_output_loading_info_returns_the_report_of_a_partial_checkpoint(family, tmp_path):
    model = twins()[family]
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(name for name in weights if ".q." in name)[0]
    kept = {name: tensor for name, tensor in weights.items() if name != dropped}
    kept["extra.weight"] = torch.zeros(2)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match"):
        type(model).from_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, type(model))
    assert dropped in set(info["missing_keys"]) and "extra.weight" in set(info["unexpected_keys"])
    other = next(name for name in kept if name != "extra.weight" and name in loaded.state_dict())
    assert torch.equal(loaded.state_dict()[other], kept[other])


def test_a_stock_checkpoint_is_refused_even_with_output_loading_info(tmp_path):
    random_stock_sam().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fused `qkv` weights"):
        SamSplitModel.from_pretrained(tmp_path, output_loading_info=True)
