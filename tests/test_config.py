"""SamSplitConfig: SAM's sizes under its own model_type, local auto_map, strict validation."""

import json

import pytest
import torch
from sam_testing import config_kwargs, tiny_sam_config
from transformers import AutoConfig, SamConfig

from sam_split import SamSplitConfig
from sam_split.configuration_sam_split import AUTO_MAP


def test_defaults_are_sam_defaults_under_own_model_type():
    config, stock = SamSplitConfig(), SamConfig()
    assert config.model_type == "sam_split" != stock.model_type
    assert config.vision_config.to_dict() == stock.vision_config.to_dict()
    assert config.mask_decoder_config.to_dict() == stock.mask_decoder_config.to_dict()
    assert config.auto_map == AUTO_MAP
    assert all("--" not in reference for reference in config.auto_map.values())  # local code, never another repo's


def test_save_load_round_trip(tmp_path):
    config = SamSplitConfig(**config_kwargs(tiny_sam_config()))
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "sam_split" and saved["auto_map"] == AUTO_MAP
    for loaded in (SamSplitConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is SamSplitConfig
        assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
        assert loaded.prompt_encoder_config.to_dict() == config.prompt_encoder_config.to_dict()
        assert loaded.mask_decoder_config.to_dict() == config.mask_decoder_config.to_dict()


def test_auto_map_from_a_hub_download_is_made_local_again():
    # transformers 4.x rewrites auto_map to "org/repo--module.Class" when it loads from the Hub; a re-saved fork
    # must still point at its own files.
    config = SamSplitConfig(auto_map={"AutoConfig": "org/repo--configuration_sam_split.SamSplitConfig"})
    assert config.auto_map == AUTO_MAP


@pytest.mark.parametrize(
    "vision, field, value",
    [
        (dict(hidden_size=33), "vision_config.hidden_size", "33"),
        (dict(window_size=-2), "vision_config.window_size", "-2"),
        (dict(patch_size=128), "vision_config.patch_size", "128"),
        (dict(num_pos_feats=16), "vision_config.num_pos_feats", "16"),
        (dict(num_attention_heads=0), "vision_config.num_attention_heads", "0"),
        (dict(attention_dropout=1.5), "vision_config.attention_dropout", "1.5"),
    ],
)
def test_invalid_values_name_field_value_and_rule(vision, field, value):
    kwargs = config_kwargs(tiny_sam_config(**vision))
    with pytest.raises(ValueError) as error:
        SamSplitConfig(**kwargs)
    message = str(error.value)
    assert f"`{field}` = {value}" in message and "invalid" in message


@pytest.mark.parametrize(
    "vision, field, value, limit",
    [
        (dict(num_hidden_layers=10**6), "vision_config.num_hidden_layers", "1000000", 128),
        (dict(mlp_dim=10**10), "vision_config.mlp_dim", "10000000000", 20480),
        (dict(hidden_size=6144, num_attention_heads=2), "vision_config.hidden_size", "6144", 5120),
    ],
)
def test_absurd_sizes_are_refused_with_the_limit(vision, field, value, limit):
    """Limits are 4x the largest released SAM's (vit-huge: 32 layers, MLP 5120, width 1280)."""
    kwargs = config_kwargs(tiny_sam_config(**vision))
    with pytest.raises(ValueError, match=rf"`{field}` = {value} is invalid: expected an integer from 1 to {limit} "):
        SamSplitConfig(**kwargs)


def test_global_attn_indexes_must_be_integers():
    # transformers 4.57 keeps a string index and never matches it, so no layer would be global; 5.x's config refuses it
    # itself (with huggingface_hub's StrictDataclassFieldValidationError, not a ValueError)
    kwargs = config_kwargs(tiny_sam_config())
    kwargs["vision_config"]["global_attn_indexes"] = ["1"]
    with pytest.raises(Exception, match="global_attn_indexes") as error:
        SamSplitConfig(**kwargs)
    if isinstance(error.value, ValueError):
        assert "expected a list of layer indexes (integers)" in str(error.value)


def test_every_transformers_test_config_is_accepted():
    """transformers' SamModel tests use SamVisionConfig's default global_attn_indexes ([2, 5, 8, 11]) with 2 layers;
    SamModel ignores indexes that name no layer, and so must we."""
    from sam_testing import sam_model_tester_config

    stock = sam_model_tester_config()
    config = SamSplitConfig(**config_kwargs(stock))
    assert config.vision_config.to_dict() == stock.vision_config.to_dict()


def test_prompt_encoder_must_match_vision_encoder():
    kwargs = config_kwargs(tiny_sam_config())
    kwargs["prompt_encoder_config"]["hidden_size"] = 32
    with pytest.raises(ValueError, match=r"prompt_encoder_config.hidden_size.*output_channels \(16\)"):
        SamSplitConfig(**kwargs)
    kwargs = config_kwargs(tiny_sam_config())
    kwargs["prompt_encoder_config"]["image_size"] = 80  # a 5x5 grid against the vision encoder's 4x4
    with pytest.raises(ValueError, match=r"prompt_encoder_config.image_size` = 80 .*vision encoder's grid.*\(4\)"):
        SamSplitConfig(**kwargs)


def test_invalid_config_json_is_refused_on_load(tmp_path):
    SamSplitConfig(**config_kwargs(tiny_sam_config())).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["vision_config"]["num_hidden_layers"] = 10**6  # would build a million layers before failing
    (tmp_path / "config.json").write_text(json.dumps(saved))
    for config_class in (SamSplitConfig, AutoConfig):
        with pytest.raises(ValueError, match=r"vision_config.num_hidden_layers` = 1000000"):
            config_class.from_pretrained(tmp_path)


def test_repository_config_json_is_sam_vit_base_split():
    from pathlib import Path

    from sam_testing import vit_base_config

    root = Path(__file__).resolve().parent.parent
    config = SamSplitConfig.from_pretrained(root)
    assert json.loads((root / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert config.architectures == ["SamSplitModel"]
    assert config.vision_config.to_dict() == vit_base_config().vision_config.to_dict()


@pytest.mark.parametrize("part", ["vision_config", "prompt_encoder_config", "mask_decoder_config"])
@pytest.mark.parametrize("eps", [-1.0, 0.0, float("nan"), float("inf")])
def test_layer_norm_eps_must_be_a_finite_positive_number(part, eps):
    kwargs = config_kwargs(tiny_sam_config())
    kwargs[part]["layer_norm_eps"] = eps
    with pytest.raises(ValueError, match=f"`{part}.layer_norm_eps` = .* expected a finite positive number"):
        SamSplitConfig(**kwargs)


def test_every_value_stock_runs_is_accepted_and_runs_as_stock():
    """transformers' own SAM tests (test_eager_matches_sdpa_inference_*) set layer_norm_eps = 1.0 in every sub-config;
    a dropout of 1.0 builds too. The twin takes them and matches stock SamModel on the same weights."""
    from sam_testing import ATOL, max_abs_diff, random_stock_sam, sample_inputs

    from sam_split import SamSplitModel

    stock_config = tiny_sam_config(layer_norm_eps=1.0, attention_dropout=1.0)
    stock_config.prompt_encoder_config.layer_norm_eps = 1.0
    stock_config.mask_decoder_config.layer_norm_eps = 1.0
    stock = random_stock_sam(stock_config)
    twin_config = SamSplitConfig(**config_kwargs(stock_config))
    assert twin_config.vision_config.layer_norm_eps == 1.0 and twin_config.mask_decoder_config.layer_norm_eps == 1.0
    twin = SamSplitModel.from_sam(stock).eval()
    inputs = sample_inputs(stock.config)
    with torch.no_grad():
        assert max_abs_diff(twin(**inputs).pred_masks, stock(**inputs).pred_masks) <= ATOL
