"""Shared helpers for the tests: small SAM configs, stock SAM models with re-randomised weights, sample prompts."""

import torch
from transformers import SamConfig, SamModel

# fp32 parity tolerance between SamSplitModel and stock SamModel on the same weights and inputs.
ATOL = 1e-5


def tiny_sam_config(**vision_overrides) -> SamConfig:
    """A SAM config small enough for many forwards per second: 64x64 images, a 4x4 grid of 16-px patches, windows of
    3 (so windowed layers pad 4 -> 6), one global layer, 2 heads of 16 channels."""
    vision = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=64, patch_size=16, window_size=3,
        global_attn_indexes=[1], output_channels=16, num_pos_feats=8, mlp_dim=64,
    )
    vision.update(vision_overrides)
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=16, image_size=vision["image_size"], patch_size=vision["patch_size"]),
        mask_decoder_config=dict(hidden_size=16, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16),
    )


def config_kwargs(config) -> dict:
    """`config`'s fields as keyword arguments for another config class of the same sizes (its `model_type` left out)."""
    return {name: value for name, value in config.to_dict().items() if name != "model_type"}


def tiny_sam_hq_config(**vision_overrides):
    """`tiny_sam_config`'s sizes as a stock `SamHQConfig` (the HQ mask decoder reads the first global layer,
    32 wide)."""
    from transformers import SamHQConfig

    sam = tiny_sam_config(**vision_overrides).to_dict()
    decoder = dict(sam["mask_decoder_config"], vit_dim=sam["vision_config"]["hidden_size"])
    return SamHQConfig(vision_config=sam["vision_config"], prompt_encoder_config=sam["prompt_encoder_config"],
                       mask_decoder_config=decoder)


def tiny_sam2_config():
    """A stock `Sam2Config` with every Hiera block kind, for many forwards per second: 64x64 images, a 16x16 grid of
    4-px patches; 4 stages of widths 8, 16, 32, 64 (blocks 0 | 1 2 | 3 4 | 5). Blocks 1, 3 and 5 start a stage: they
    pool the query (dim != dim_out), block 1 inside windows of 4, blocks 3 and 5 in windows of 2; block 4 is global,
    blocks 0 and 2 windowed. Feature levels 16x16, 8x8, 4x4 (the 4x4 one is the mask decoder's image embedding)."""
    from transformers import Sam2Config

    backbone = dict(
        model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1, image_size=[64, 64],
        blocks_per_stage=[1, 2, 2, 1], embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 2, 2, 4],
        window_size_per_stage=[4, 2, 2, 2], global_attention_blocks=[4],
        window_positional_embedding_background_size=[4, 4],
    )
    return Sam2Config(
        vision_config=dict(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                           backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]], fpn_hidden_size=16),
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16),
        mask_decoder_config=dict(hidden_size=16, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16),
    )


def random_stock(model_class, config, seed: int = 0, attn_implementation: str = "sdpa"):
    """A stock transformers model of `model_class` (SamModel, SamHQModel, Sam2Model, Sam2VideoModel) with random
    N(0, 0.05) weights, in eval mode."""
    config = type(config).from_dict(config.to_dict())
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return randomize_(model_class(config), seed).eval()


def vit_base_config() -> SamConfig:
    """The sizes of facebook/sam-vit-base."""
    from sam_split.configuration_sam_split import SAM_SIZES  # here: some child processes prove the package is absent

    return SamConfig(vision_config=SAM_SIZES["vit-base"])


def sam_model_tester_config(**vision_overrides) -> SamConfig:
    """The sizes of transformers' own SamModel tests (`SamModelTester` in tests/models/sam/test_modeling_sam.py): two
    vision layers with SamVisionConfig's default `global_attn_indexes` ([2, 5, 8, 11]: no layer is global), a 12x12
    grid of 2-px patches padded to one 14x14 window."""
    vision = dict(
        hidden_size=36, output_channels=32, num_hidden_layers=2, num_attention_heads=4, image_size=24, patch_size=2,
        window_size=14, num_pos_feats=16,
    )
    vision.update(vision_overrides)
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=32, image_size=vision["image_size"], patch_size=vision["patch_size"],
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=4, iou_head_hidden_dim=32),
    )


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """`sam_split.tools.family.randomize_`: every weight and buffer N(0, std) (imported here, when called: some child
    processes run these helpers where the package is not importable)."""
    from sam_split.tools.family import randomize_ as randomize

    return randomize(model, seed, std)


def random_stock_sam(config: SamConfig | None = None, seed: int = 0, attn_implementation: str = "sdpa") -> SamModel:
    """A stock transformers `SamModel` with random N(0, 0.05) weights, in eval mode."""
    config = SamConfig.from_dict((config or tiny_sam_config()).to_dict())
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return randomize_(SamModel(config), seed).eval()


def sample_inputs(config: SamConfig, batch_size: int = 2, seed: int = 0) -> dict:
    """Pixel values plus a point prompt (2 points, one positive and one negative) per image."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_points": torch.rand(batch_size, 1, 2, 2, generator=generator) * size,
        "input_labels": torch.tensor([[[1, 0]]] * batch_size),
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_python(code: str, env: dict | None = None, timeout: float = 300, replace_env: bool = False) -> str:
    """Run `code` in a fresh Python process (same interpreter) and return its stdout; fail with its stderr.

    `env` is added to a copy of this process's environment (or replaces it with `replace_env`), so huggingface_hub in
    the child reads fresh HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE values at import time.
    """
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], env=env if replace_env else {**os.environ, **(env or {})}, capture_output=True,
        text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"child process failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def add_lora(model, rank: int = 16, seed: int | None = None, target_modules=("q", "v")):
    """`model` wrapped by PEFT with LoRA of rank `rank` on `target_modules`, by default the vision encoder's `q` and `v`
    (in place, as PEFT does).

    With `seed`, the LoRA weights are re-randomised N(0, 0.05): PEFT's zero-initialised B makes the adapter a no-op
    and the gradient of A zero, so parity of outputs or gradients would prove nothing."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)))
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return peft_model


def hub_env(url: str, hf_home, token: str | None = None, **extra) -> dict:
    """Environment for a child process that talks to the local Hub server at `url` with its own HF_HOME (so its own
    download and remote-code caches). Proxies are dropped: the server is on 127.0.0.1."""
    import os

    env = {
        name: value
        for name, value in os.environ.items()
        if not name.lower().endswith("_proxy") and not name.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.update(
        HF_ENDPOINT=url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1,localhost",
    )
    if token is not None:
        env["HF_TOKEN"] = token
    env.update({name: str(value) for name, value in extra.items()})
    return env
