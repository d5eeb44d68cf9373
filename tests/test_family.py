"""The SAM-HQ and SAM 2 twins: exact parity with the stock models on re-randomised weights, strict conversion both
ways (SAM 2.1's video checkpoints included), LoRA on exactly the vision q/v at every released size, gradient
checkpointing, the files a repository ships, remote-code loading, and SAM 3's vision-only LoRA target."""

import json
import re
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from sam_testing import ATOL, add_lora, max_abs_diff, random_stock, run_python, tiny_sam2_config, tiny_sam_hq_config
from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel, SamHQConfig, SamHQModel

from sam_split import Sam2SplitConfig, Sam2SplitModel, SamHQSplitConfig, SamHQSplitModel, SamSplitModel
from sam_split.configuration_sam2_split import SAM2_SIZES
from sam_split.configuration_sam_hq_split import SAM_HQ_SIZES

TWINS = {"sam_hq": (SamHQModel, SamHQSplitModel, tiny_sam_hq_config),
         "sam2": (Sam2Model, Sam2SplitModel, tiny_sam2_config)}
BOX = {"input_boxes": torch.tensor([[[6.0, 10.0, 50.0, 58.0]], [[0.0, 4.0, 40.0, 30.0]]])}


def prompts(kind: str, config) -> dict:
    """Two 64x64 images with a point prompt (one positive, one negative point) or a box prompt each."""
    generator = torch.Generator().manual_seed(0)
    size = config.prompt_encoder_config.image_size
    inputs = {
        "pixel_values": torch.randn(2, 3, size, size, generator=generator),
        "input_points": torch.rand(2, 1, 2, 2, generator=generator) * size,
        "input_labels": torch.tensor([[[1, 0]]] * 2),
    }
    if kind == "box":
        inputs = {"pixel_values": inputs["pixel_values"], **BOX}
    return inputs


def family_outputs(model, inputs: dict, **kwargs) -> dict:
    """Every output a family member has: masks, IoU scores, image embeddings (each SAM 2 level, SAM-HQ's intermediate
    embeddings too) and SAM 2's object scores."""
    with torch.no_grad():
        outputs = model(**inputs, **kwargs)
        result = {"masks": outputs.pred_masks, "iou": outputs.iou_scores}
        if isinstance(model, Sam2Model):
            result |= {f"level {n}": level for n, level in enumerate(outputs.image_embeddings)}
            result["object scores"] = outputs.object_score_logits
        else:
            encoded = model.vision_encoder(inputs["pixel_values"])
            result["image embeddings"] = encoded.last_hidden_state
            result |= {f"intermediate {n}": level for n, level in enumerate(encoded.intermediate_embeddings)}
    return result


def assert_same_outputs(actual: dict, expected: dict, atol=ATOL):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        assert expected[name].abs().max() > 0, name  # parity on zeros would prove nothing
        assert max_abs_diff(actual[name], expected[name]) <= atol, name


@pytest.fixture(scope="module", params=sorted(TWINS))
def family(request):
    stock_class, twin_class, tiny_config = TWINS[request.param]
    stock = random_stock(stock_class, tiny_config())
    return request.param, stock, twin_class.from_stock(stock)


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("kind", ["points", "box"])
def test_twin_equals_stock(family, kind):
    name, stock, twin = family
    inputs = prompts(kind, stock.config)
    extra = [dict(hq_token_only=False), dict(hq_token_only=True)] if name == "sam_hq" else [{}]
    for kwargs in extra:
        assert_same_outputs(family_outputs(twin, inputs, **kwargs), family_outputs(stock, inputs, **kwargs))
    if name == "sam2":  # every feature level, and the object score that SAM 2 adds
        assert len([key for key in family_outputs(twin, inputs) if key.startswith("level")]) == 3


def test_the_comparison_fails_when_q_k_v_are_wrong(family):
    """Swapping the q and v weights of one vision attention block (rows split in the wrong order) must break parity:
    the checks can fail."""
    _, stock, twin = family
    attention = next(module for module in twin.modules() if hasattr(module, "q") and hasattr(module, "k"))
    broken = type(twin).from_stock(stock)
    broken_attention = next(module for module in broken.modules() if hasattr(module, "q") and hasattr(module, "k"))
    with torch.no_grad():
        broken_attention.q.weight.copy_(attention.v.weight)
        broken_attention.v.weight.copy_(attention.q.weight)
    inputs = prompts("points", stock.config)
    with pytest.raises(AssertionError):
        assert_same_outputs(family_outputs(broken, inputs), family_outputs(stock, inputs))


def test_tiny_sam2_config_has_every_block_kind():
    blocks = Sam2SplitModel(Sam2SplitConfig(**tiny_sam2_config().to_dict())).vision_encoder.backbone.blocks
    kinds = {(block.window_size > 0, block.query_stride is not None, block.dim != block.dim_out) for block in blocks}
    # windowed, global, and query-pooling stage starts (dim != dim_out) inside windows
    assert {(True, False, False), (False, False, False), (True, True, True)} <= kinds
    hq = SamHQSplitModel(SamHQSplitConfig(**tiny_sam_hq_config().to_dict())).vision_encoder.layers
    assert {layer.window_size > 0 for layer in hq} == {True, False}


def test_sam_hq_eager_attention_records_the_attention_weights():
    stock = random_stock(SamHQModel, tiny_sam_hq_config(), attn_implementation="eager")
    twin = SamHQSplitModel.from_stock(stock)
    pixels = prompts("points", stock.config)["pixel_values"]
    with torch.no_grad():
        expected = stock.vision_encoder(pixels, output_attentions=True).attentions
        actual = twin.vision_encoder(pixels, output_attentions=True).attentions
    assert len(actual) == len(expected) == 3
    for a, b in zip(actual, expected):
        assert max_abs_diff(a, b) <= ATOL


@pytest.mark.parametrize("size", ["hiera-tiny", "hiera-large"])
def test_sam2_real_size_stage_start_block_equals_stock(size):
    """The first block of stage 2 at a released width (dim -> 2 dim, query pooling, windows), on a 28x28 grid."""
    config = Sam2Config(**SAM2_SIZES[size]).vision_config.backbone_config
    config._attn_implementation = "sdpa"  # set by the model that owns a config; a block built alone has none on 4.57
    stock_block = transformers.models.sam2.modeling_sam2.Sam2MultiScaleBlock(config, 1, 0, 0)
    torch.manual_seed(0)
    from sam_testing import randomize_

    randomize_(stock_block).eval()
    from sam_split.modeling_sam2_split import Sam2SplitMultiScaleAttention
    from sam_split.split_qkv import split_qkv_state_dict

    twin_block = transformers.models.sam2.modeling_sam2.Sam2MultiScaleBlock(config, 1, 0, 0)
    attn = stock_block.attn
    twin_block.attn = Sam2SplitMultiScaleAttention(config, attn.dim, attn.dim_out, attn.num_attention_heads,
                                                   attn.query_stride)
    split = split_qkv_state_dict({f"block.{key}": value for key, value in stock_block.state_dict().items()})
    twin_block.load_state_dict({key.removeprefix("block."): value for key, value in split.items()}, strict=True)
    twin_block.eval()
    hidden = torch.randn(1, 28, 28, attn.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = stock_block(hidden), twin_block(hidden)
    assert actual.shape == (1, 14, 14, attn.dim_out)
    assert max_abs_diff(actual, expected) <= ATOL


def test_sam_hq_real_size_layers_equal_stock():
    """A windowed and a global vision layer at SAM-HQ vit-base's width (768, 12 heads), on a 20x20 grid (windows of 14:
    padded to 28x28)."""
    from sam_testing import randomize_
    from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionLayer

    from sam_split.modeling_sam_hq_split import SamHQSplitVisionAttention
    from sam_split.split_qkv import split_qkv_state_dict

    config = SamHQConfig(**SAM_HQ_SIZES["vit-base"]).vision_config
    config._attn_implementation = "sdpa"
    hidden = torch.randn(1, 20, 20, config.hidden_size, generator=torch.Generator().manual_seed(1))
    for window_size in (config.window_size, 0):
        stock_layer = randomize_(SamHQVisionLayer(config, window_size)).eval()
        twin_layer = SamHQVisionLayer(config, window_size)
        twin_layer.attn = SamHQSplitVisionAttention(config, window_size)
        split = split_qkv_state_dict({f"layer.{key}": value for key, value in stock_layer.state_dict().items()})
        twin_layer.load_state_dict({key.removeprefix("layer."): value for key, value in split.items()}, strict=True)
        with torch.no_grad():
            expected, actual = stock_layer(hidden), twin_layer.eval()(hidden)
        expected, actual = (output[0] if isinstance(output, tuple) else output for output in (expected, actual))
        assert max_abs_diff(actual, expected) <= ATOL, window_size


# ----------------------------------------------------------------------------------- real sizes: keys and LoRA

LORA_COUNTS = {
    ("sam_hq", "vit-base"): 589_824, ("sam_hq", "vit-large"): 1_572_864, ("sam_hq", "vit-huge"): 2_621_440,
    ("sam2", "hiera-tiny"): 279_552, ("sam2", "hiera-small"): 377_856, ("sam2", "hiera-base-plus"): 663_040,
    ("sam2", "hiera-large"): 1_718_784,
}
VISION_QV = {
    "sam_hq": re.compile(r"vision_encoder\.layers\.\d+\.attn\.(q|v)"),
    "sam2": re.compile(r"vision_encoder\.backbone\.blocks\.\d+\.attn\.(q|v)"),
}


@pytest.mark.parametrize("name,size", sorted(LORA_COUNTS))
def test_real_size_keys_shapes_and_lora_counts(name, size):
    stock_class, twin_class, _ = TWINS[name]
    stock_config_class, sizes = (SamHQConfig, SAM_HQ_SIZES) if name == "sam_hq" else (Sam2Config, SAM2_SIZES)
    with torch.device("meta"):
        stock = stock_class(stock_config_class(**sizes[size]))
        twin = twin_class(twin_class.config_class(**sizes[size]))
    from sam_split.split_qkv import split_qkv_state_dict

    expected = {key: tuple(value.shape) for key, value in split_qkv_state_dict(stock.state_dict()).items()}
    assert {key: tuple(value.shape) for key, value in twin.state_dict().items()} == expected
    peft_model = add_lora(twin)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == LORA_COUNTS[name, size]
    adapted = {name.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
               for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    vision_qv = {module for module, _ in twin.named_modules() if VISION_QV[name].fullmatch(module)}
    assert adapted == vision_qv and len(vision_qv) == 2 * sum(1 for key in expected if key.endswith("attn.q.weight"))


# ----------------------------------------------------------------------------------------------- conversion


def assert_same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_conversion_both_ways_is_exact(family):
    _, stock, twin = family
    back = twin.to_stock()
    assert type(back) is type(stock)
    assert_same_state(back.state_dict(), stock.state_dict())
    assert not [key for key in twin.state_dict() if ".qkv." in key]


@pytest.fixture(scope="module")
def family_folders(family, tmp_path_factory):
    name, stock, twin = family
    root = tmp_path_factory.mktemp(name)
    stock.save_pretrained(root / "stock")
    twin.save_pretrained(root / "twin")
    return name, root / "stock", root / "twin"


def test_save_pretrained_ships_only_the_code_the_model_imports(family_folders):
    name, _, folder = family_folders
    code = {"sam_hq": ["attention_sam_split.py", "compat.py", "configuration_sam_hq_split.py",
                       "modeling_sam_hq_split.py", "split_qkv.py"],
            "sam2": ["compat.py", "configuration_sam2_split.py", "modeling_sam2_split.py", "split_qkv.py"]}[name]
    assert sorted(path.name for path in folder.iterdir()) == sorted(code + ["config.json", "model.safetensors"])
    config = json.loads((folder / "config.json").read_text())
    twin_class = TWINS[name][1]
    assert config["model_type"] == twin_class.config_class.model_type
    assert config["auto_map"]["AutoModel"] == f"{twin_class.__module__.rsplit('.', 1)[1]}.{twin_class.__name__}"


def test_from_pretrained_is_strict(family_folders, tmp_path):
    name, stock_folder, folder = family_folders
    twin_class = TWINS[name][1]
    with pytest.raises(ValueError, match=rf"stock .* checkpoint with fused `qkv`.*{twin_class.__name__}\.from_stock"):
        twin_class.from_pretrained(stock_folder)
    for item in folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(folder / "model.safetensors")
    del weights[next(key for key in weights if key.endswith("attn.v.bias"))]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights.*Refusing to keep randomly initialised weights"):
        twin_class.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already split"):
        twin_class.from_stock(folder)
    reloaded = twin_class.from_pretrained(folder)
    assert type(reloaded) is twin_class


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """A stock SAM 2 *video* checkpoint (what facebook/sam2.1-hiera-* are), tiny, random."""
    image = tiny_sam2_config()
    config = Sam2VideoConfig(vision_config=image.vision_config.to_dict(),
                             prompt_encoder_config=image.prompt_encoder_config.to_dict(),
                             mask_decoder_config=image.mask_decoder_config.to_dict())
    folder = tmp_path_factory.mktemp("video")
    random_stock(Sam2VideoModel, config).save_pretrained(folder)
    return folder


def test_sam2_video_checkpoint_converts_leaving_out_the_memory_weights(video_folder):
    stock, left_out = Sam2SplitModel.load_stock(video_folder)
    assert type(stock) is Sam2Model and left_out
    assert {key.split(".")[0] for key in left_out} >= {"memory_attention", "memory_encoder", "object_pointer_proj"}
    twin = Sam2SplitModel.from_stock(video_folder)
    inputs = prompts("points", twin.config)
    assert_same_outputs(family_outputs(twin, inputs), family_outputs(stock, inputs))
    video = Sam2VideoModel.from_pretrained(video_folder)
    for key, value in twin.to_stock().state_dict().items():  # the image model's weights are the video model's
        assert torch.equal(value, video.state_dict()[key]), key


def test_sam2_video_checkpoint_with_another_unexpected_weight_is_refused(video_folder, tmp_path):
    for item in video_folder.iterdir():
        (tmp_path / item.name).write_bytes(item.read_bytes())
    weights = load_file(video_folder / "model.safetensors")
    weights["mask_decoder.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete SAM 2 checkpoint.*unexpected \['mask_decoder\.extra\.weight'\]"):
        Sam2SplitModel.from_stock(tmp_path)


# ------------------------------------------------------------------------------------- training and loading


def test_sam2_gradient_checkpointing_gives_the_same_gradients():
    twin = Sam2SplitModel.from_stock(random_stock(Sam2Model, tiny_sam2_config()))
    model = add_lora(twin, rank=4, seed=0)
    pixels = prompts("points", twin.config)["pixel_values"]

    def lora_gradients():
        model.zero_grad()
        levels = model.base_model.model.vision_encoder(pixels).fpn_hidden_states
        sum(level.square().mean() for level in levels).backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}

    model.train()
    plain = lora_gradients()
    twin.gradient_checkpointing_enable()
    assert any(getattr(module, "gradient_checkpointing", False) for module in twin.modules())
    checkpointed = lora_gradients()
    assert plain and sorted(plain) == sorted(checkpointed)
    assert all(plain[name].abs().max() > 0 for name in plain if "lora_A" in name or "lora_B" in name)
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-6), name


@pytest.mark.slow
def test_remote_code_loads_each_twin_in_a_fresh_process(family_folders, tmp_path):
    name, _, folder = family_folders
    out = run_python(
        textwrap.dedent(f"""
            import sys
            from transformers import AutoModel, AutoModelForMaskGeneration
            for auto_class in (AutoModel, AutoModelForMaskGeneration):
                model = auto_class.from_pretrained({str(folder)!r}, trust_remote_code=True)
                assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
                print(type(model).__name__)
            assert "sam_split" not in sys.modules
        """),
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"},
    )
    assert out.split() == [TWINS[name][1].__name__] * 2


def test_the_mask_generation_pipeline_knows_the_twins():
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASK_GENERATION_MAPPING_NAMES as names

    assert names["sam_split"] == "SamSplitModel" and isinstance(SamSplitModel, type)
    assert names["sam_hq_split"] == "SamHQSplitModel" and names["sam2_split"] == "Sam2SplitModel"


@pytest.mark.skipif(not hasattr(transformers, "Sam3Model"), reason="SAM 3 is in transformers 5 only")
def test_sam3_vision_lora_target_regex_adapts_exactly_the_vit_q_and_v():
    """SAM 3 has separate q/k/v already; `["q_proj", "v_proj"]` also hits its text encoder, DETR encoder/decoder,
    geometry encoder and mask decoder. The documented regex adapts only the ViT backbone's q and v."""
    from peft import LoraConfig, get_peft_model

    config = transformers.Sam3Config(
        vision_config=dict(backbone_config=dict(model_type="sam3_vit_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1])),
    )
    with torch.device("meta"):
        model = transformers.Sam3Model(config)
    regex = r".*vision_encoder\.backbone\.layers\.\d+\.attention\.(q|v)_proj"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=regex))
    adapted = {name.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
               for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert adapted == {f"vision_encoder.backbone.layers.{layer}.attention.{p}_proj" for layer in (0, 1) for p in "qv"}
    with torch.device("meta"):
        broad = get_peft_model(transformers.Sam3Model(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hit = {name.split(".")[2] for name, _ in broad.named_parameters() if ".lora_A" in name}
    assert len(hit) > 1 and "vision_encoder" in hit  # the plain names reach beyond the vision backbone
