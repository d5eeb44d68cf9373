"""SamSplitModel equals stock SamModel on the same re-randomised weights and inputs (fp32, max abs diff <= 1e-5).

Masks of a small random SAM barely move even when q/k/v are wrong, so every comparison includes the image
embeddings, and `test_the_comparison_flags_wrong_qkv` shows that the same check catches a model with bad q/k/v.
"""

import pytest
import torch
from sam_testing import (
    ATOL,
    max_abs_diff,
    random_stock_sam,
    randomize_,
    sample_inputs,
    tiny_sam_config,
    vit_base_config,
)

from sam_split import SamSplitModel

IMPLEMENTATIONS = ("eager", "sdpa")


@pytest.fixture(scope="module")
def stock():
    """Stock SamModel per attention implementation, all with the same weights."""
    return {impl: random_stock_sam(attn_implementation=impl) for impl in IMPLEMENTATIONS}


@pytest.fixture(scope="module")
def split(stock):
    return {impl: SamSplitModel.from_sam(model) for impl, model in stock.items()}


def prompts(config, kind: str, batch_size: int = 2) -> dict:
    inputs = sample_inputs(config, batch_size)
    size = config.vision_config.image_size
    grid = size // config.vision_config.patch_size
    boxes = torch.tensor([[[0.1, 0.2, 0.7, 0.9]]] * batch_size) * size
    if kind == "points":
        return inputs
    if kind == "boxes":
        return {"pixel_values": inputs["pixel_values"], "input_boxes": boxes}
    if kind == "points+boxes":
        return {**inputs, "input_boxes": boxes}
    if kind == "mask":
        return {**inputs, "input_masks": torch.randn(batch_size, 1, 4 * grid, 4 * grid,
                                                     generator=torch.Generator().manual_seed(1))}
    raise ValueError(kind)


def assert_same_outputs(reference, candidate, inputs: dict, **forward_kwargs):
    """Image embeddings, masks and IoU scores of `candidate` equal `reference`'s within ATOL."""
    with torch.no_grad():
        expected = reference(**inputs, **forward_kwargs)
        actual = candidate(**inputs, **forward_kwargs)
        embedding_diff = max_abs_diff(
            reference.get_image_embeddings(inputs["pixel_values"]),
            candidate.get_image_embeddings(inputs["pixel_values"]),
        )
    assert embedding_diff <= ATOL, f"image embeddings differ by {embedding_diff:.3g}"
    assert max_abs_diff(expected.pred_masks, actual.pred_masks) <= ATOL
    assert max_abs_diff(expected.iou_scores, actual.iou_scores) <= ATOL
    return expected, actual


def test_weights_are_not_near_zero(stock):
    rel_pos = stock["eager"].vision_encoder.layers[0].attn.rel_pos_h
    assert rel_pos.std() > 0.02  # re-randomised: parity on zero rel-pos tables would prove little


def test_no_fused_qkv_left(split):
    names = [name for name, _ in split["sdpa"].named_parameters()]
    assert not [name for name in names if "qkv" in name]
    layers = split["sdpa"].config.vision_config.num_hidden_layers
    for projection in "qkv":
        assert len([n for n in names if n.endswith(f".attn.{projection}.weight")]) == layers


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", ["points", "boxes", "points+boxes", "mask"])
@pytest.mark.parametrize("multimask_output", [True, False])
def test_masks_scores_and_embeddings_match_stock(stock, split, impl, kind, multimask_output):
    inputs = prompts(stock[impl].config, kind)
    expected, _ = assert_same_outputs(stock[impl], split[impl], inputs, multimask_output=multimask_output)
    assert expected.pred_masks.shape[2] == (3 if multimask_output else 1)


def test_sdpa_matches_stock_eager(stock, split):
    """The fast path against the plain textbook computation, not only against stock's own sdpa."""
    assert_same_outputs(stock["eager"], split["sdpa"], prompts(stock["eager"].config, "points+boxes"))


@pytest.mark.parametrize("vision", [dict(use_rel_pos=False), dict(window_size=2, global_attn_indexes=[0, 2])])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_other_vision_layouts_match_stock(vision, impl):
    reference = random_stock_sam(tiny_sam_config(**vision), attn_implementation=impl)
    assert_same_outputs(reference, SamSplitModel.from_sam(reference), sample_inputs(reference.config))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_precomputed_image_embeddings_and_prompt_embeddings(stock, split, impl):
    inputs = sample_inputs(stock[impl].config)
    with torch.no_grad():
        embeddings = stock[impl].get_image_embeddings(inputs["pixel_values"])
        prompt_inputs = {"input_points": inputs["input_points"], "input_labels": inputs["input_labels"]}
        expected = stock[impl](image_embeddings=embeddings, **prompt_inputs)
        actual = split[impl](image_embeddings=split[impl].get_image_embeddings(inputs["pixel_values"]), **prompt_inputs)
        for a, b in zip(stock[impl].get_prompt_embeddings(**prompt_inputs),
                        split[impl].get_prompt_embeddings(**prompt_inputs)):
            assert max_abs_diff(a, b) == 0.0
    assert max_abs_diff(expected.pred_masks, actual.pred_masks) <= ATOL
    assert max_abs_diff(expected.iou_scores, actual.iou_scores) <= ATOL


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_attentions_and_hidden_states(stock, split, impl):
    inputs = sample_inputs(stock[impl].config)
    expected, actual = assert_same_outputs(
        stock[impl], split[impl], inputs, output_attentions=impl == "eager", output_hidden_states=True
    )
    layers = stock[impl].config.vision_config.num_hidden_layers
    assert len(actual.vision_hidden_states) == len(expected.vision_hidden_states) == layers + 1
    for a, b in zip(expected.vision_hidden_states, actual.vision_hidden_states):
        assert max_abs_diff(a, b) <= ATOL
    if impl == "eager":
        assert len(actual.vision_attentions) == layers
        for a, b in zip(expected.vision_attentions, actual.vision_attentions):
            assert a.shape == b.shape and max_abs_diff(a, b) <= ATOL


def test_the_comparison_flags_wrong_qkv(stock, split):
    """What the broken recipe produces (q/k/v left random) and a subtler mistake (k and v swapped) both fail the
    image-embedding check, even where the masks alone might pass."""
    inputs = sample_inputs(stock["sdpa"].config)
    wrong_random = SamSplitModel.from_sam(stock["sdpa"])
    for layer_index, layer in enumerate(wrong_random.vision_encoder.layers):
        for projection in (layer.attn.q, layer.attn.k, layer.attn.v):
            randomize_(projection, seed=100 + layer_index)
    wrong_swapped = SamSplitModel.from_sam(stock["sdpa"])
    with torch.no_grad():
        for layer in wrong_swapped.vision_encoder.layers:
            k_weight = layer.attn.k.weight.clone()
            layer.attn.k.weight.copy_(layer.attn.v.weight)
            layer.attn.v.weight.copy_(k_weight)
    for wrong in (wrong_random, wrong_swapped):
        with pytest.raises(AssertionError, match="image embeddings differ"):
            assert_same_outputs(stock["sdpa"], wrong, inputs)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradient_checkpointing_gives_stock_gradients(impl):
    """Training goes through `forward` (transformers wraps `get_image_embeddings` in no_grad); with checkpointing the
    gradients of q, k and v are the row blocks of stock's qkv gradient."""
    reference = random_stock_sam(attn_implementation=impl).train()
    model = SamSplitModel.from_sam(reference).train()
    reference.gradient_checkpointing_enable()
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.vision_encoder.layers)
    inputs = sample_inputs(reference.config)
    for candidate in (reference, model):
        candidate(**inputs).pred_masks.square().mean().backward()
    for stock_layer, layer in zip(reference.vision_encoder.layers, model.vision_encoder.layers):
        for part, projection in zip(stock_layer.attn.qkv.weight.grad.chunk(3),
                                    (layer.attn.q, layer.attn.k, layer.attn.v)):
            assert projection.weight.grad is not None
            torch.testing.assert_close(projection.weight.grad, part, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_vit_base_shape_at_1024():
    """One test on the real sam-vit-base shape: 64x64 patch grid, 14x14 windows padded to 70, global layers. Stock runs
    its eager path, ours the default sdpa one (on a CPU the chunked kernel); each encoder runs once (~10 s each
    here)."""
    reference = random_stock_sam(vit_base_config(), attn_implementation="eager")
    model = SamSplitModel.from_sam(reference)  # takes over the source's "eager"...
    model.set_attn_implementation("sdpa")  # ...so switch to the default, memory-lean path
    assert model.vision_encoder.layers[0].attn.config._attn_implementation == "sdpa"
    inputs = sample_inputs(reference.config, batch_size=1)
    prompt = {"input_points": inputs["input_points"], "input_labels": inputs["input_labels"]}
    with torch.no_grad():
        expected_embeddings = reference.vision_encoder(inputs["pixel_values"])[0]
        embeddings = model.vision_encoder(inputs["pixel_values"])[0]
        expected = reference(image_embeddings=expected_embeddings, **prompt)
        actual = model(image_embeddings=embeddings, **prompt)
    embedding_diff = max_abs_diff(expected_embeddings, embeddings)
    mask_diff = max_abs_diff(expected.pred_masks, actual.pred_masks)
    print(f"vit-base 1024: image embeddings {embedding_diff:.2e}, masks {mask_diff:.2e}")
    assert expected_embeddings.shape == (1, 256, 64, 64)
    assert embedding_diff <= ATOL and mask_diff <= ATOL
    assert max_abs_diff(expected.iou_scores, actual.iou_scores) <= ATOL
