"""An image array and prompts through SamProcessor, both models, and post_process_masks; and bad input."""

import numpy as np
import pytest
import torch
from sam_testing import ATOL, max_abs_diff, random_stock_sam, sample_inputs

from sam_split import SamSplitModel
from sam_split.tools.processing import (
    model_processor,  # SamImageProcessorPil where transformers 5 would need torchvision
)


@pytest.fixture(scope="module")
def models():
    stock = random_stock_sam()
    return stock, SamSplitModel.from_sam(stock)


def test_processor_point_and_box_prompt_to_full_size_masks(models):
    stock, model = models
    size = stock.config.vision_config.image_size
    processor = model_processor(stock.config)
    image = np.random.default_rng(0).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)  # height 48, width 80
    inputs = processor(
        images=image, input_points=[[[30, 20]]], input_labels=[[1]], input_boxes=[[[10, 5, 60, 40]]],
        return_tensors="pt",
    )
    assert inputs["pixel_values"].shape == (1, 3, size, size)
    with torch.no_grad():
        expected, actual = stock(**inputs), model(**inputs)
        embedding_diff = max_abs_diff(stock.get_image_embeddings(inputs["pixel_values"]),
                                      model.get_image_embeddings(inputs["pixel_values"]))
    assert embedding_diff <= ATOL
    assert max_abs_diff(expected.iou_scores, actual.iou_scores) <= ATOL
    masks = processor.post_process_masks(actual.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    expected_masks = processor.post_process_masks(expected.pred_masks, inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])
    assert masks[0].shape == (1, 3, 48, 80) and masks[0].dtype == torch.bool
    # Binarised at logit 0: logits within ATOL of each other may only flip where they sit within ATOL of 0.
    logits = processor.post_process_masks(actual.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"],
                                          binarize=False)
    assert torch.all((masks[0] == expected_masks[0]) | (logits[0].abs() <= ATOL))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i: {**i, "pixel_values": i["pixel_values"][0]},
         r"`pixel_values` must have shape \(\*, 3, 64, 64\), got \(3, 64, 64\)"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][:, :1]},
         r"`pixel_values` must have shape \(\*, 3, 64, 64\), got \(2, 1, 64, 64\)"),
        (lambda i: {**i, "pixel_values": i["pixel_values"][..., :32, :32]}, r"got \(2, 3, 32, 32\)"),
        (lambda i: {**i, "input_points": i["input_points"][:1], "input_labels": i["input_labels"][:1]},
         r"`input_points` must have shape \(2, \*, \*, 2\).*got \(1, 1, 2, 2\)"),
        (lambda i: {**i, "input_labels": i["input_labels"][..., :1]}, r"`input_labels` must have shape \(2, 1, 2\)"),
        (lambda i: {"pixel_values": i["pixel_values"], "input_labels": i["input_labels"]}, "without `input_points`"),
        (lambda i: {**i, "input_boxes": torch.zeros(1, 1, 4)}, r"`input_boxes` must have shape \(2, \*, 4\)"),
        (lambda i: {**i, "input_masks": torch.zeros(2, 64, 64)}, r"`input_masks` must have shape \(2, 1, 16, 16\)"),
        (lambda i: {"input_points": i["input_points"]}, "exactly one of `pixel_values` and `image_embeddings`"),
        (lambda i: {**i, "image_embeddings": torch.zeros(2, 16, 4, 4)}, "exactly one of"),
    ],
)
def test_bad_input_is_a_clear_error(models, change, message):
    _, model = models
    with pytest.raises(ValueError, match=message):
        model(**change(sample_inputs(model.config)))


def test_points_without_labels_are_foreground_as_in_sam_and_said_so(models, caplog):
    stock, model = models
    inputs = sample_inputs(model.config)
    unlabeled = {"pixel_values": inputs["pixel_values"], "input_points": inputs["input_points"]}
    with torch.no_grad():
        implicit = model(**unlabeled)
        explicit = model(**unlabeled, input_labels=torch.ones_like(inputs["input_labels"]))
        reference = stock(**unlabeled)
    assert max_abs_diff(implicit.pred_masks, explicit.pred_masks) == 0.0
    assert max_abs_diff(implicit.pred_masks, reference.pred_masks) <= ATOL


def test_forward_is_sam_models_own_and_checks_positional_inputs_too(models):
    """The shape checks run in a forward pre-hook: `forward` stays SamModel's (signature and annotations included, which
    transformers introspects), so arguments transformers adds later pass through untouched."""
    stock, model = models
    assert type(model).forward is type(stock).forward
    inputs = sample_inputs(model.config)
    with pytest.raises(ValueError, match=r"`pixel_values` must have shape \(\*, 3, 64, 64\), got \(3, 64, 64\)"):
        model(inputs["pixel_values"][0], inputs["input_points"], inputs["input_labels"])
    with torch.no_grad():
        positional = model(inputs["pixel_values"], inputs["input_points"], inputs["input_labels"])
        reference = stock(**inputs)
    assert max_abs_diff(positional.pred_masks, reference.pred_masks) <= ATOL


def test_a_patched_or_wrapped_forward_is_checked_by_its_own_signature(models):
    """A tool may replace `forward` with one of another argument order (optimum's ONNX exporter does). The pre-hook
    used to bind positional arguments to SamModel.forward's order and refused such calls; it binds them to the
    forward that runs, checks what it can name, and leaves a forward whose arguments it cannot name alone."""
    stock, model = models
    inputs = sample_inputs(model.config)
    points, labels = inputs["input_points"], inputs["input_labels"]
    with torch.no_grad():
        embeddings = model.get_image_embeddings(inputs["pixel_values"])
        reference = stock(image_embeddings=embeddings, input_points=points, input_labels=labels)
    original = model.forward

    def patched_forward(input_points, input_labels, image_embeddings):  # prompts first, as optimum's SAM patch
        return original(image_embeddings=image_embeddings, input_points=input_points, input_labels=input_labels)

    def wrapper(*args, **kwargs):  # no functools.wraps: nothing to name the arguments by
        return patched_forward(*args, **kwargs)

    try:
        model.forward = patched_forward
        with torch.no_grad():
            patched = model(points, labels, embeddings)
        with pytest.raises(ValueError, match=r"`input_labels` must have shape \(2, 1, 2\)"):
            model(points, labels[..., :1], embeddings)
        model.forward = wrapper
        with torch.no_grad():
            wrapped = model(points, labels, embeddings)
    finally:
        del model.forward
    assert max_abs_diff(patched.pred_masks, reference.pred_masks) <= ATOL
    assert max_abs_diff(wrapped.pred_masks, reference.pred_masks) <= ATOL
