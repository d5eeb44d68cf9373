"""What the SAM benchmarks share: their sizes, random stock models, random LoRA, inputs, FLOP counts and formatting.

Models come from the package's own `random:` sizes (`sam_split.tools.family`) with its re-randomiser, so a benchmark
measures the weights push.py would verify; nothing here reaches into the tests.
"""

import torch
from transformers import SamConfig, SamModel

from sam_split.tools.family import member_for_random, randomize_

# Benchmark size -> (`random:` size, input side or None for the size's own). "tiny" is the small CPU size at 64x64:
# a smoke run of a benchmark's code path in seconds.
SIZES = {"vit-base": ("sam-vit-base", None), "tiny": ("sam-tiny", 64)}


def sam_config(size: str, image_size: int | None = None) -> SamConfig:
    """The stock `SamConfig` of benchmark size `size`, at `image_size` (default: the size's own input side)."""
    random_size, default_side = SIZES[size]
    config = member_for_random(random_size).stock_config(random_size).to_dict()
    side = image_size or default_side
    if side:
        config["vision_config"]["image_size"] = config["prompt_encoder_config"]["image_size"] = side
        config["prompt_encoder_config"].pop("image_embedding_size", None)  # derived from image_size in __init__
    names = ("vision_config", "prompt_encoder_config", "mask_decoder_config")
    return SamConfig(**{name: config[name] for name in names})


def random_stock_sam(config: SamConfig, seed: int = 0, attn_implementation: str = "sdpa") -> SamModel:
    """A stock `SamModel` of `config` with N(0, 0.05) weights, in eval mode."""
    config = SamConfig.from_dict(config.to_dict())
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return randomize_(SamModel(config), seed).eval()


def add_lora(model, seed: int, target_modules=("q", "v"), rank: int = 16):
    """`model` under PEFT LoRA of rank `rank` on `target_modules`, its LoRA weights N(0, 0.05) (PEFT's zero B would
    make the adapter a no-op and the gradient of A zero)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return peft_model


def sample_inputs(config: SamConfig, batch_size: int, seed: int = 0) -> dict:
    """Pixel values plus a positive and a negative point per image."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    return {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
        "input_points": torch.rand(batch_size, 1, 2, 2, generator=generator) * size,
        "input_labels": torch.tensor([[[1, 0]]] * batch_size),
    }


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def encoder_gflop(config: SamConfig) -> float:
    """fp32 FLOPs (2 per multiply-add) of one image through the vision encoder, as computed, i.e. with the windowed
    layers' padding; softmax, norms and activations are left out."""
    vision = config.vision_config
    grid, channels, mlp = vision.image_size // vision.patch_size, vision.hidden_size, vision.mlp_dim
    flops = 2 * grid**2 * channels * vision.num_channels * vision.patch_size**2  # patch embedding
    for index in range(vision.num_hidden_layers):
        window = grid if index in vision.global_attn_indexes else vision.window_size
        tokens = (-(-grid // window) * window) ** 2  # padded to whole windows
        flops += 2 * tokens * channels * (4 * channels + 2 * mlp)  # q, k, v, proj, mlp
        flops += 4 * tokens * window**2 * channels  # q @ k^T and probs @ v over each window
        flops += 2 * tokens * channels * 2 * window  # decomposed relative-position bias
    flops += 2 * grid**2 * vision.output_channels * (channels + 9 * vision.output_channels)  # neck
    return flops / 1e9


def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)
