"""Explicit, strict conversion between stock SAM and SamSplitModel, and loading through the Auto classes."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from sam_testing import ATOL, max_abs_diff, random_stock_sam, run_python, sam_model_tester_config, sample_inputs
from transformers import AutoModel, SamModel

from sam_split import SamSplitModel


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    """A stock (fused qkv) SamModel checkpoint with random N(0, 0.05) weights."""
    folder = tmp_path_factory.mktemp("stock")
    random_stock_sam().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def split_folder(stock_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("split")
    SamSplitModel.from_sam(stock_folder).save_pretrained(folder)
    return folder


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_from_sam_splits_rows_in_order(stock_folder):
    stock = SamModel.from_pretrained(stock_folder)
    model = SamSplitModel.from_sam(stock)
    for stock_layer, layer in zip(stock.vision_encoder.layers, model.vision_encoder.layers):
        hidden = layer.attn.q.in_features
        for index, projection in enumerate((layer.attn.q, layer.attn.k, layer.attn.v)):
            rows = slice(index * hidden, (index + 1) * hidden)
            assert torch.equal(projection.weight, stock_layer.attn.qkv.weight[rows])
            assert torch.equal(projection.bias, stock_layer.attn.qkv.bias[rows])
    assert_same_state(model.state_dict(), SamSplitModel.from_sam(stock_folder).state_dict())


def test_to_sam_round_trip_is_exact(stock_folder):
    stock = SamModel.from_pretrained(stock_folder)
    back = SamSplitModel.from_sam(stock).to_sam()
    assert type(back) is SamModel and back.config.model_type == "sam"
    assert_same_state(back.state_dict(), stock.state_dict())
    inputs = sample_inputs(stock.config)
    with torch.no_grad():
        assert max_abs_diff(back(**inputs).pred_masks, stock(**inputs).pred_masks) == 0.0


def test_save_pretrained_writes_split_weights_code_and_local_auto_map(stock_folder, split_folder):
    files = sorted(path.name for path in split_folder.iterdir())
    # the model code and the files it imports relatively: the Hub's remote-code loader needs them all
    assert files == ["attention_sam_split.py", "compat.py", "config.json", "configuration_sam_split.py",
                     "model.safetensors", "modeling_sam_split.py", "split_qkv.py"]
    config = json.loads((split_folder / "config.json").read_text())
    assert config["model_type"] == "sam_split" and config["architectures"] == ["SamSplitModel"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sam_split.SamSplitConfig",
        "AutoModel": "modeling_sam_split.SamSplitModel",
        "AutoModelForMaskGeneration": "modeling_sam_split.SamSplitModel",
    }
    keys = load_file(split_folder / "model.safetensors").keys()
    assert not [key for key in keys if "qkv" in key]
    assert {"vision_encoder.layers.0.attn.q.weight", "vision_encoder.layers.0.attn.v.bias"} <= set(keys)
    reloaded = SamSplitModel.from_pretrained(split_folder)
    assert_same_state(reloaded.state_dict(), SamSplitModel.from_sam(stock_folder).state_dict())


@pytest.mark.slow
def test_auto_classes_load_remote_code_in_a_fresh_process(stock_folder, split_folder, tmp_path):
    """stock -> from_sam -> save -> AutoModel(trust_remote_code) in a new process with an empty HF_HOME (so an empty
    modules cache, and no import of this package) -> to_sam -> back here: all equal."""
    inputs = sample_inputs(SamModel.from_pretrained(stock_folder).config)
    torch.save(inputs, tmp_path / "inputs.pt")
    out = run_python(
        textwrap.dedent(f"""
            import sys, torch
            from transformers import AutoModel, AutoModelForMaskGeneration
            inputs = torch.load({str(tmp_path / "inputs.pt")!r})
            results = {{}}
            for auto_class in (AutoModel, AutoModelForMaskGeneration):
                model = auto_class.from_pretrained({str(split_folder)!r}, trust_remote_code=True).eval()
                assert type(model).__name__ == "SamSplitModel", type(model)
                assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
                with torch.no_grad():
                    outputs = model(**inputs)
                    results[auto_class.__name__] = (model.get_image_embeddings(inputs["pixel_values"]),
                                                    outputs.pred_masks, outputs.iou_scores)
            assert "sam_split" not in sys.modules  # the code came from the checkpoint folder
            torch.save(results, {str(tmp_path / "results.pt")!r})
            model.to_sam().save_pretrained({str(tmp_path / "back")!r})
            print("remote module", type(model).__module__)
        """),
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
    )
    assert "remote module transformers_modules." in out
    stock = SamModel.from_pretrained(stock_folder)
    with torch.no_grad():
        expected = stock(**inputs)
        expected_embeddings = stock.get_image_embeddings(inputs["pixel_values"])
    for embeddings, masks, scores in torch.load(tmp_path / "results.pt").values():
        assert max_abs_diff(embeddings, expected_embeddings) <= ATOL
        assert max_abs_diff(masks, expected.pred_masks) <= ATOL
        assert max_abs_diff(scores, expected.iou_scores) <= ATOL
    assert_same_state(SamModel.from_pretrained(tmp_path / "back").state_dict(), stock.state_dict())


def test_importing_the_package_registers_the_auto_classes(split_folder):
    model = AutoModel.from_pretrained(split_folder)  # no trust_remote_code: the installed package serves the class
    assert type(model) is SamSplitModel


def test_stock_checkpoint_is_refused_with_a_pointer_to_from_sam(stock_folder):
    with pytest.raises(ValueError, match=r"stock SAM checkpoint with fused `qkv`.*SamSplitModel\.from_sam"):
        SamSplitModel.from_pretrained(stock_folder)


@pytest.mark.parametrize("change", ["drop q", "drop v bias", "extra key"])
def test_missing_or_unexpected_weights_are_errors(split_folder, tmp_path, change):
    for name in ("config.json", "configuration_sam_split.py", "modeling_sam_split.py"):
        (tmp_path / name).write_bytes((split_folder / name).read_bytes())
    weights = load_file(split_folder / "model.safetensors")
    if change == "drop q":
        del weights["vision_encoder.layers.0.attn.q.weight"]
    elif change == "drop v bias":
        del weights["vision_encoder.layers.2.attn.v.bias"]
    else:
        weights["vision_encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing" if "drop" in change else "unexpected") as error:
        SamSplitModel.from_pretrained(tmp_path)
    assert "Refusing to keep randomly initialised weights" in str(error.value)


def test_from_sam_refuses_what_it_cannot_convert(split_folder, tmp_path):
    from transformers import BertConfig, BertModel

    bert_config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    BertModel(bert_config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a stock SAM checkpoint \(model_type='bert'"):
        SamSplitModel.from_sam(tmp_path)
    with pytest.raises(ValueError, match="already split"):
        SamSplitModel.from_sam(split_folder)
    with pytest.raises(TypeError, match="already split"):
        SamSplitModel.from_sam(SamSplitModel.from_pretrained(split_folder))
    with pytest.raises(OSError):
        SamSplitModel.from_sam(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    "vision",
    [
        {},  # SamVisionConfig's default global_attn_indexes [2, 5, 8, 11] with 2 layers
        dict(global_attn_indexes=[1, 1]),
        dict(global_attn_indexes=[-1]),
        dict(window_size=0),  # every layer global
        dict(image_size=25),  # not a multiple of patch_size: the patch embedding drops the last row and column
    ],
    ids=["default-global-indexes", "duplicate-index", "negative-index", "window-0", "image-not-patch-multiple"],
)
def test_from_sam_takes_every_config_sammodel_builds(vision):
    """transformers' own SamModel test configs (and other odd ones SamModel builds and runs) convert, and the split
    model computes what the stock one does."""
    stock = random_stock_sam(sam_model_tester_config(**vision))
    model = SamSplitModel.from_sam(stock)
    assert model.config.vision_config.global_attn_indexes == stock.config.vision_config.global_attn_indexes
    assert [layer.window_size for layer in model.vision_encoder.layers] == [
        layer.window_size for layer in stock.vision_encoder.layers
    ]
    inputs = sample_inputs(stock.config)
    with torch.no_grad():
        expected, actual = stock(**inputs), model(**inputs)
        assert max_abs_diff(model.get_image_embeddings(inputs["pixel_values"]),
                            stock.get_image_embeddings(inputs["pixel_values"])) <= ATOL
    assert max_abs_diff(actual.pred_masks, expected.pred_masks) <= ATOL
    assert max_abs_diff(actual.iou_scores, expected.iou_scores) <= ATOL
