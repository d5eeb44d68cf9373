"""The tools' differences between the supported library releases, in one place: transformers 4.57 / 5.x (processors,
mask generation with or without torchvision) and huggingface_hub 0.x / 1.x / 2.x (its HTTP client). Nothing else in
the tools branches on a version or on torchvision. The model files keep theirs in the root `compat.py`.
"""

import importlib.util

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub import utils
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import _http
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# ------------------------------------------------------------------------------------------------------ processors


def sam_image_processor_class():
    """transformers 5's `SamImageProcessor` needs torchvision and its `SamImageProcessorPil` does not; 4.57 has only
    the numpy/PIL `SamImageProcessor`."""
    return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def sam2_image_processor(image_size: int, mask_grid: int):
    """A `Sam2Processor` resizing images to `image_size` squared and segmentation maps to `mask_grid` squared.

    transformers' `Sam2ImageProcessor` (5.x) / `Sam2ImageProcessorFast` (4.57) is torchvision-only; where torchvision
    is missing, `Sam2ImageProcessorPil` stands in (same steps with PIL: bilinear resize, ImageNet normalisation,
    nearest-neighbour masks; `post_process_masks` is the same torch code)."""
    if importlib.util.find_spec("torchvision") is not None:
        image_processor_class = getattr(transformers, "Sam2ImageProcessor", None) or transformers.Sam2ImageProcessorFast
        image_processor = image_processor_class(size={"height": image_size, "width": image_size},
                                                mask_size={"height": mask_grid, "width": mask_grid})
        return transformers.Sam2Processor(image_processor=image_processor)
    return _Sam2ProcessorPil(image_processor=Sam2ImageProcessorPil(image_size, mask_grid))


class Sam2ImageProcessorPil(BaseImageProcessor):
    """SAM 2's image preprocessing without torchvision: RGB, resized (bilinear) to a `size` square with no padding,
    rescaled to [0, 1], normalised with ImageNet's mean and std; segmentation maps resized (nearest) to `mask_size`.

    Measured against torchvision's (benchmarks/README.md): equal pixel values where the image is enlarged, within one
    grey level where it is shrunk; labels, prompts and post-processed masks equal."""

    model_input_names = ["pixel_values"]  # noqa: RUF012 - a list, as transformers' processors concatenate it

    def __init__(self, image_size: int = 1024, mask_grid: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.size = {"height": image_size, "width": image_size}
        self.mask_size = {"height": mask_grid, "width": mask_grid}
        self.image_mean, self.image_std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)

    def preprocess(self, images, segmentation_maps=None, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        mean, std = np.array(self.image_mean, np.float32), np.array(self.image_std, np.float32)
        pixel_values, original_sizes = [], []
        for image in images:
            image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            original_sizes.append([image.height, image.width])
            resized = image.convert("RGB").resize((self.size["width"], self.size["height"]), Image.BILINEAR)
            pixel_values.append(((np.asarray(resized, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
        data = {"pixel_values": np.stack(pixel_values), "original_sizes": np.array(original_sizes)}
        if segmentation_maps is not None:
            maps = segmentation_maps if isinstance(segmentation_maps, (list, tuple)) else [segmentation_maps]
            size = (self.mask_size["width"], self.mask_size["height"])
            data["labels"] = np.stack([np.asarray(Image.fromarray(np.asarray(m).astype(np.uint8)).resize(
                size, Image.NEAREST)).astype(np.int64) for m in maps])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_masks(self, masks, original_sizes, mask_threshold=0.0, binarize=True, max_hole_area=0.0,
                           max_sprinkle_area=0.0, apply_non_overlapping_constraints=False, **kwargs):
        """transformers' `Sam2ImageProcessor.post_process_masks` (bilinear to the original size, then threshold; it
        ignores the hole and sprinkle areas too), without the non-overlapping constraint."""
        if apply_non_overlapping_constraints:
            raise ValueError("Sam2ImageProcessorPil has no non-overlapping constraint: install torchvision")
        if torch.is_tensor(original_sizes) or isinstance(original_sizes, np.ndarray):
            original_sizes = original_sizes.tolist()
        output = []
        for mask, original_size in zip(masks, original_sizes):
            mask = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
            mask = F.interpolate(mask, original_size, mode="bilinear", align_corners=False)
            output.append(mask > mask_threshold if binarize else mask)
        return output


class _Sam2ProcessorPil(transformers.Sam2Processor):
    """`Sam2Processor` (its prompt handling) around `Sam2ImageProcessorPil`: 4.57 accepts only its torchvision image
    processor there, so the expected class is widened to any image processor."""

    image_processor_class = "AutoImageProcessor"


def sam_preprocessor_config(image_size: int) -> dict:
    """SAM's standard preprocessing as a `preprocessor_config.json` that `AutoProcessor` loads on transformers 4.57 and
    5.x alike, in the form of the released checkpoints. Saving `processing.model_processor(config)` would not do: on
    5.x it names `SamImageProcessorPil`, which 4.57 does not know; the name `SamImageProcessor` loads on both (5.x
    picks the class that its installed packages support)."""
    return {
        "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "SamImageProcessor", "processor_class": "SamProcessor",
        "pad_size": {"height": image_size, "width": image_size}, "size": {"longest_edge": image_size},
        "resample": 2, "rescale_factor": 1 / 255,
    }


def sam_hq_preprocessor_config(image_size: int) -> dict:
    """SAM-HQ's standard preprocessing (SAM's image processor under `SamHQProcessor`), loadable by `AutoProcessor` on
    transformers 4.57 and 5.x as `sam_preprocessor_config` is."""
    return {**sam_preprocessor_config(image_size), "processor_class": "SamHQProcessor"}


def sam2_preprocessor_config(image_size: int) -> dict:
    """SAM 2's standard preprocessing in the form of the released facebook/sam2.1-hiera-* checkpoints: images resized
    (not padded) to `image_size` squared, masks to a quarter of that. Its image processor needs torchvision on both
    4.57 (`Sam2ImageProcessorFast`, the only one there) and 5.x, as for the stock checkpoints."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "Sam2ImageProcessorFast", "processor_class": "Sam2Processor",
        "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": image_size // 4, "width": image_size // 4},
        "resample": 2, "rescale_factor": 1 / 255,
    }


# ------------------------------------------------------------------------------------------------ mask generation
#
# Where transformers' automatic mask generation calls torchvision (checked on 4.57.6 and 5.23.0): only the final NMS,
# `torchvision.ops.boxes.batched_nms`, in `post_process_for_mask_generation`:
#   - 5.23 `SamImageProcessorPil` (the one the tools use for SAM and SAM-HQ): imported inside
#     `image_processing_pil_sam._post_process_for_mask_generation`, so it fails only when called;
#   - 4.57 `SamImageProcessor` (numpy/PIL): imported at module level only `if is_torchvision_available()`, so the call
#     fails with a NameError;
#   - SAM 2's image processors (5.23 `Sam2ImageProcessor`, 4.57 `Sam2ImageProcessorFast`) and the torchvision SAM ones
#     import torchvision at module level; without it the tools use `Sam2ImageProcessorPil`, which has no
#     mask-generation methods: SAM's image processor's stand in (the same computations, copied in transformers from
#     SAM to SAM 2; the tests compare the two where torchvision is installed).
# `generate_crop_boxes` and `filter_masks` need no torchvision anywhere. So the fallback is injected here, once: where
# torchvision is missing, `post_process_for_mask_generation` runs transformers' steps with `batched_nms` below.


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def mask_generation_processor(image_processor):
    """The image processor whose `generate_crop_boxes`, `filter_masks` and `post_process_for_mask_generation` serve
    `image_processor`'s model: itself, or for the SAM 2 stand-in (`Sam2ImageProcessorPil`) SAM's image processor."""
    if hasattr(image_processor, "filter_masks"):
        return image_processor
    return sam_image_processor_class()()


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Pure-torch `torchvision.ops.batched_nms`, used only where torchvision is missing: per category (`idxs`), greedy
    non-maximum suppression in the order of a stable descending sort of `scores`, dropping a box whose IoU with a kept
    one is above `iou_threshold` (IoU computed as torchvision's CPU kernel computes it, in the boxes' dtype); the kept
    indices in descending score order, ties by index. Equal to torchvision's on the tests' random and tied cases
    (tests/test_automatic.py). With one category, as transformers calls it, it is torchvision's computation; with
    several, torchvision (under 1,000 boxes on CPU) shifts each category's boxes apart first, which can round an IoU
    within float precision of `iou_threshold` differently."""
    keep = []
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).flatten()
        keep.append(members[_nms(boxes[members], scores[members], iou_threshold)])
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    keep = torch.sort(torch.cat(keep)).values
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's `nms` (its CPU kernel, `nms_kernel_impl`): indices kept, in descending score order."""
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for position, i in enumerate(order.tolist()):
        if suppressed[position]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        width = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        height = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        intersection = width * height
        overlap = intersection / (areas[i] + areas[rest] - intersection)
        # Compared in float64, as the kernel compares its float IoU with its double threshold: IoU 24/80 in float32
        # (0.30000001) is above 0.3, but not above 0.3 rounded to float32.
        suppressed[position + 1:] |= overlap.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def post_process_for_mask_generation(image_processor, rle_masks: list, scores: torch.Tensor, boxes: torch.Tensor,
                                     nms_threshold: float) -> tuple[list, torch.Tensor, list, torch.Tensor]:
    """transformers' `post_process_for_mask_generation` of `image_processor` (NMS over all crops' masks by their
    boxes, then the kept RLEs decoded): (bool masks as numpy arrays, scores, uncompressed RLEs, boxes) of the kept
    masks. Without torchvision, the same steps with the pure-torch `batched_nms` above."""
    if not rle_masks:
        return [], scores, [], boxes
    if torchvision_available():
        masks, scores, rle_masks, boxes = image_processor.post_process_for_mask_generation(
            rle_masks, scores, boxes, nms_threshold)
        return [np.asarray(mask, dtype=bool) for mask in masks], scores, rle_masks, boxes
    keep = batched_nms(boxes.float(), scores, torch.zeros(boxes.shape[0]), nms_threshold)
    rle_masks = [rle_masks[i] for i in keep]
    return [_rle_to_mask(rle) for rle in rle_masks], scores[keep], rle_masks, boxes[keep]


def _rle_to_mask(rle: dict) -> np.ndarray:
    """transformers' `_rle_to_mask`: an uncompressed column-major RLE (counts start with a 0-run) as a bool mask."""
    height, width = rle["size"]
    values = np.repeat(np.arange(len(rle["counts"])) % 2 == 1, rle["counts"])
    return values.reshape(width, height).T


# ---------------------------------------------------------------------------------------------- huggingface_hub


def _hub_http_library():
    """The HTTP client library huggingface_hub runs on: `requests` (0.x), `httpx` (1.x) or `httpx2` (2.x)."""
    for name in ("httpx2", "httpx", "requests"):
        if hasattr(_http, name):
            return getattr(_http, name)
    raise ImportError(f"huggingface_hub's HTTP client library is none of httpx2, httpx, requests ({_http.__file__})")


def hub_failure_types() -> tuple[type[BaseException], ...]:
    """The exceptions huggingface_hub raises when the Hub or the network fails: HTTP errors (`HfHubHTTPError`), refused
    or dropped connections and timeouts (0.x: `requests.RequestException`, an `OSError`; 1.x/2.x: `httpx.HTTPError` /
    `httpx2.HTTPError`, not an `OSError`), the Xet uploader's (a builtin `ConnectionError`, an `OSError`, or a
    `RuntimeError`) and invalid names (`HFValidationError`, a `ValueError`)."""
    library = _hub_http_library()
    transport_error = getattr(library, "RequestException", None) or library.HTTPError
    return (HfHubHTTPError, HFValidationError, transport_error, OSError, RuntimeError)


def set_hub_timeout(seconds: float) -> None:
    """Make every huggingface_hub request that sets no timeout of its own (uploads, commits, `whoami`, ...) give up
    after `seconds` without an answer (connecting, sending or waiting for data); by default they wait forever."""
    if hasattr(utils, "set_client_factory"):  # 1.x / 2.x: one shared httpx client, made by a factory
        from huggingface_hub.utils._http import default_client_factory

        def client_with_timeout():
            client = default_client_factory()
            client.timeout = seconds
            return client

        utils.set_client_factory(client_with_timeout)
    else:  # 0.x: a requests Session per thread, made by a "backend factory"; requests has no client-wide timeout
        from huggingface_hub import configure_http_backend
        from huggingface_hub.utils._http import _default_backend_factory

        def session_with_timeout():
            session = _default_backend_factory()
            request = session.request

            def request_with_timeout(method, url, **kwargs):
                if kwargs.get("timeout") is None:
                    kwargs["timeout"] = seconds
                return request(method, url, **kwargs)

            session.request = request_with_timeout
            return session

        configure_http_backend(session_with_timeout)
