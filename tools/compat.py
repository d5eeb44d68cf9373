"""The tools' differences between the supported library releases, in one place: transformers 4.57 / 5.x (processors,
mask generation with or without torchvision) and huggingface_hub 0.x / 1.x / 2.x (its HTTP client). Nothing else in
the tools branches on a version or on torchvision. The model files keep theirs in the root `compat.py`.
"""

import importlib.util

import numpy as np
import torch
import transformers
from huggingface_hub import utils
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import _http

from ..processing_sam2_split import Sam2SplitImageProcessor, Sam2SplitProcessor

# ------------------------------------------------------------------------------------------------------ processors


def sam_image_processor_class():
    """transformers 5's `SamImageProcessor` needs torchvision and its `SamImageProcessorPil` does not; 4.57 has only
    the numpy/PIL `SamImageProcessor`."""
    return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def sam2_image_processor(image_size: int, mask_grid: int):
    """A `Sam2Processor` resizing images to `image_size` squared and segmentation maps to `mask_grid` squared.

    transformers' `Sam2ImageProcessor` (5.x) / `Sam2ImageProcessorFast` (4.57) is torchvision-only; where torchvision
    is missing, the processor a SAM 2 twin's repository ships (`processing_sam2_split.Sam2SplitProcessor`, what
    `AutoProcessor` loads from it with `trust_remote_code=True`) stands in: the same steps with PIL."""
    if importlib.util.find_spec("torchvision") is not None:
        image_processor_class = getattr(transformers, "Sam2ImageProcessor", None) or transformers.Sam2ImageProcessorFast
        image_processor = image_processor_class(size={"height": image_size, "width": image_size},
                                                mask_size={"height": mask_grid, "width": mask_grid})
        return transformers.Sam2Processor(image_processor=image_processor)
    return Sam2SplitProcessor(image_processor=Sam2SplitImageProcessor(image_size, mask_grid))


def sam3_tracker_class():
    """transformers' `Sam3TrackerModel`, or None on 4.57 (SAM 3 is in transformers 5 only)."""
    return getattr(transformers, "Sam3TrackerModel", None)


def sam3_tracker_processor(image_size: int, mask_grid: int):
    """A `Sam3TrackerProcessor` resizing images to `image_size` squared and segmentation maps to `mask_grid` squared.

    Its image processor, transformers' `Sam3ImageProcessor`, is SAM 2's with another normalisation (mean and std 0.5,
    `IMAGENET_STANDARD_*`) and, as SAM 2's, torchvision-only; without torchvision the SAM 2 stand-in does the same
    steps with PIL (`processing_sam2_split.Sam2SplitImageProcessor`, given the tracker's mean and std). The prompt
    handling is the tracker's own (SAM 2's code)."""
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

    if importlib.util.find_spec("torchvision") is not None:
        image_processor = transformers.Sam3ImageProcessor(size={"height": image_size, "width": image_size},
                                                          mask_size={"height": mask_grid, "width": mask_grid})
    else:
        image_processor = Sam2SplitImageProcessor(image_size, mask_grid, image_mean=list(IMAGENET_STANDARD_MEAN),
                                                  image_std=list(IMAGENET_STANDARD_STD))
    return transformers.Sam3TrackerProcessor(image_processor=image_processor)


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
    4.57 (`Sam2ImageProcessorFast`, the only one there) and 5.x, as for the stock checkpoints; push.py adds the
    `auto_map` of the repository's own processor, which does not."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
        "image_processor_type": "Sam2ImageProcessorFast", "processor_class": "Sam2Processor",
        "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": image_size // 4, "width": image_size // 4},
        "resample": 2, "rescale_factor": 1 / 255,
    }


def sam3_tracker_preprocessor_config(image_size: int, mask_grid: int) -> dict:
    """The SAM 3 tracker's standard preprocessing (`Sam3ImageProcessor`: SAM 2's steps, mean and std 0.5; masks
    `mask_grid` squared, 288 at image size 1008), in the form of `sam2_preprocessor_config`; transformers 5 only,
    torchvision-only as SAM 2's."""
    return {**sam2_preprocessor_config(image_size), "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Sam3ImageProcessor", "processor_class": "Sam3TrackerProcessor",
            "mask_size": {"height": mask_grid, "width": mask_grid}}


def with_shipped_processor(contents: dict, auto_map: dict) -> dict:
    """A processor config (`preprocessor_config.json`, or 5.x's `processor_config.json`, which nests the image
    processor's) that names the repository's own processor classes in `auto_map`, for `AutoProcessor` /
    `AutoImageProcessor` with `trust_remote_code=True`, and keeps the stock classes for loading without it.

    A legacy `...Fast` image processor name (the released SAM 2.1 configs' `Sam2ImageProcessorFast`) becomes its
    5.x name: 5.x warns that the `Fast` suffix is deprecated; 4.57, which has only the Fast class, raises for it
    without torchvision before it reads `auto_map`, and finds no class by the 5.x name, so goes on to `auto_map`.
    (4.57's stock `Sam2Processor` loads its image processor by its own class attribute, not by this name.)"""
    contents = {**contents, "auto_map": {**contents.get("auto_map", {}), **auto_map}}
    if str(contents.get("image_processor_type", "")).endswith("Fast"):
        contents["image_processor_type"] = contents["image_processor_type"].removesuffix("Fast")
    if isinstance(contents.get("image_processor"), dict):  # 5.x's processor_config.json
        contents["image_processor"] = with_shipped_processor(
            contents["image_processor"], {"AutoImageProcessor": auto_map["AutoImageProcessor"]})
    return contents


# ------------------------------------------------------------------------------------------------ mask generation
#
# Where transformers' automatic mask generation calls torchvision (checked on 4.57.6 and 5.23.0): only the final NMS,
# `torchvision.ops.boxes.batched_nms`, in `post_process_for_mask_generation`:
#   - 5.23 `SamImageProcessorPil` (the one the tools use for SAM and SAM-HQ): imported inside
#     `image_processing_pil_sam._post_process_for_mask_generation`, so it fails only when called;
#   - 4.57 `SamImageProcessor` (numpy/PIL): imported at module level only `if is_torchvision_available()`, so the call
#     fails with a NameError;
#   - SAM 2's image processors (5.23 `Sam2ImageProcessor`, 4.57 `Sam2ImageProcessorFast`) and the torchvision SAM ones
#     import torchvision at module level; without it the tools use `Sam2SplitImageProcessor`, which has no
#     mask-generation methods: SAM's image processor's stand in (the same computations, copied in transformers from
#     SAM to SAM 2; the tests compare the two where torchvision is installed).
# `generate_crop_boxes` and `filter_masks` need no torchvision anywhere. So the fallback is injected here, once: where
# torchvision is missing, `post_process_for_mask_generation` runs transformers' steps with `batched_nms` below.


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def mask_generation_processor(image_processor):
    """The image processor whose `generate_crop_boxes`, `filter_masks` and `post_process_for_mask_generation` serve
    `image_processor`'s model: itself, or for the SAM 2 stand-in (`Sam2SplitImageProcessor`) SAM's image processor."""
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


_hub_timeout: list[float] = []  # the seconds `set_hub_timeout` set, for `hub_timeout`


def hub_timeout() -> float | None:
    """The seconds of the last `set_hub_timeout`, or None."""
    return _hub_timeout[-1] if _hub_timeout else None


def set_hub_timeout(seconds: float) -> None:
    """Make every huggingface_hub request that sets no timeout of its own (uploads, commits, `whoami`, ...) give up
    after `seconds` without an answer (connecting, sending or waiting for data); by default they wait forever.

    1.x/2.x: a request that passes `timeout=None` itself (every paginated listing does: `list_repo_commits`,
    `list_repo_tree`) would wait forever on the client's default too, so a request hook puts `seconds` in its place."""
    _hub_timeout[:] = [seconds]
    if hasattr(utils, "set_client_factory"):  # 1.x / 2.x: one shared httpx client, made by a factory
        from huggingface_hub.utils._http import default_client_factory

        library = _hub_http_library()
        bounded = library.Timeout(seconds).as_dict()

        def no_unbounded_wait(request):
            timeouts = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {name: bounded[name] if timeouts.get(name) is None else value
                                             for name, value in {**bounded, **timeouts}.items()}

        def client_with_timeout():
            client = default_client_factory()
            client.timeout = seconds
            client.event_hooks = {**client.event_hooks,
                                  "request": [*client.event_hooks.get("request", []), no_unbounded_wait]}
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
