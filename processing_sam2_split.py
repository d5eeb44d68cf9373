"""SAM 2's processor without torchvision, shipped in a SAM 2 twin's repository and named by its processor configs'
`auto_map`, so `AutoProcessor.from_pretrained(repo, trust_remote_code=True)` works on a CPU install.

transformers' `Sam2ImageProcessor` (5.x) / `Sam2ImageProcessorFast` (4.57) imports torchvision; this one does the same
steps with PIL and numpy: RGB, resized (bilinear) to a `size` square with no padding, rescaled to [0, 1], normalised
with ImageNet's mean and std; segmentation maps resized (nearest) to `mask_size`; `post_process_masks` is the same
torch code (bilinear to the original size, then the threshold). Compared with torchvision's on the same inputs
(tests/test_processor.py, benchmarks/compare_sam2_processors.py): labels, prompts, sizes and post-processed masks
equal, pixel values within one grey level (equal where the image is enlarged). The prompt handling is
`Sam2Processor`'s own.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Sam2Processor, Sam2VideoProcessor
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.processing_utils import ProcessorMixin

from .compat import accept_any_image_processor

_CONFIG_NAMES = ("image_processor_type", "processor_class", "auto_map", "_processor_class")


def _square(size, name: str) -> dict:
    """A `{"height", "width"}` size from an int or such a dict; anything else is an error."""
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return {"height": int(size["height"]), "width": int(size["width"])}
    raise ValueError(f"{name} must be an int or {{'height': H, 'width': W}}, got {size!r}")


class Sam2SplitImageProcessor(BaseImageProcessor):
    """SAM 2's image preprocessing with PIL and numpy (no torchvision), configured by the keys of the released
    facebook/sam2.1-hiera-* `preprocessor_config.json` (`size`, `mask_size`, `image_mean`, `image_std`,
    `rescale_factor`, `resample` 2 = bilinear, the `do_*` switches).

    Args:
        size (`int` or `dict`, *optional*, defaults to 1024): the square the image is resized to.
        mask_size (`int` or `dict`, *optional*, defaults to 256): the square segmentation maps are resized to (the
            side of the model's `pred_masks`).
    """

    model_input_names = ["pixel_values"]  # noqa: RUF012 - a list, as transformers' processors concatenate it

    def __init__(self, size=1024, mask_size=256, image_mean=None, image_std=None, rescale_factor: float = 1 / 255,
                 resample: int = 2, do_resize: bool = True, do_rescale: bool = True, do_normalize: bool = True,
                 do_convert_rgb: bool = True, **kwargs):
        # The names a saved config carries, and the settings transformers' fast processors save as None / False /
        # their defaults; any other setting would silently not be applied, so it is an error.
        benign = {"data_format": "channels_first", "default_to_square": True}
        unexpected = sorted(key for key, value in kwargs.items() if key not in _CONFIG_NAMES
                            and value not in (None, False) and benign.get(key, object()) != value)
        if unexpected:
            raise ValueError(f"Sam2SplitImageProcessor does not support the settings {unexpected}")
        super().__init__()
        if resample != Image.BILINEAR:
            raise ValueError(f"Sam2SplitImageProcessor resizes bilinearly (resample=2), got resample={resample}")
        self.size, self.mask_size = _square(size, "size"), _square(mask_size, "mask_size")
        self.image_mean = list(IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean)
        self.image_std = list(IMAGENET_DEFAULT_STD if image_std is None else image_std)
        self.rescale_factor, self.resample = rescale_factor, resample
        self.do_resize, self.do_rescale, self.do_normalize = do_resize, do_rescale, do_normalize
        self.do_convert_rgb = do_convert_rgb

    def _pixels(self, image: Image.Image) -> np.ndarray:
        """One image as a (3, height, width) float32 array."""
        if self.do_convert_rgb:
            image = image.convert("RGB")
        if self.do_resize:
            image = image.resize((self.size["width"], self.size["height"]), Image.BILINEAR)
        pixels = np.asarray(image, np.float32)
        if self.do_rescale:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.array(self.image_mean, np.float32)) / np.array(self.image_std, np.float32)
        return pixels.transpose(2, 0, 1)

    def preprocess(self, images, segmentation_maps=None, return_tensors=None, **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        images = [image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)) for image in images]
        data = {"pixel_values": np.stack([self._pixels(image) for image in images]),
                "original_sizes": np.array([[image.height, image.width] for image in images])}
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
            raise ValueError("Sam2SplitImageProcessor has no non-overlapping constraint: install torchvision")
        if torch.is_tensor(original_sizes) or isinstance(original_sizes, np.ndarray):
            original_sizes = original_sizes.tolist()
        output = []
        for mask, original_size in zip(masks, original_sizes):
            mask = torch.from_numpy(mask) if isinstance(mask, np.ndarray) else mask
            mask = F.interpolate(mask, original_size, mode="bilinear", align_corners=False)
            output.append(mask > mask_threshold if binarize else mask)
        return output


@accept_any_image_processor
class Sam2SplitProcessor(Sam2Processor):
    """`Sam2Processor` (its prompt handling) around `Sam2SplitImageProcessor`, or any image processor (4.57's
    `Sam2Processor` accepts only its torchvision one: `compat.accept_any_image_processor`)."""


class _FramesAsImages:
    """What `Sam2VideoProcessor.init_video_session` asks of its video processor (`pixel_values_videos` and
    `original_sizes` of one video), done frame by frame by an image processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, videos, device=None, return_tensors=None, **kwargs) -> BatchFeature:
        frames = self.image_processor(images=list(videos), return_tensors="pt")
        pixels = frames["pixel_values"] if device is None else frames["pixel_values"].to(device)
        return BatchFeature({"pixel_values_videos": pixels[None], "original_sizes": frames["original_sizes"][:1]})


@accept_any_image_processor
class Sam2SplitVideoProcessor(Sam2VideoProcessor):
    """`Sam2VideoProcessor` (its inference sessions, prompt handling and mask post-processing) whose frames go through
    `Sam2SplitImageProcessor` (or any image processor) instead of transformers' torchvision-only video processor:
    `init_video_session(video=frames)` takes a list of frames (PIL images or HxWx3 arrays); streaming takes each
    frame's `processor(images=frame).pixel_values[0]`, as with stock."""

    attributes = ["image_processor"]  # noqa: RUF012 - 4.57 reads this list; 5.x reads `__init__`'s arguments

    def __init__(self, image_processor, target_size: int | None = None, point_pad_value: int = -10, **kwargs):
        ProcessorMixin.__init__(self, image_processor, **kwargs)
        self.video_processor = _FramesAsImages(self.image_processor)
        self.point_pad_value = point_pad_value
        self.target_size = target_size if target_size is not None else self.image_processor.size["height"]


__all__ = ["Sam2SplitImageProcessor", "Sam2SplitProcessor", "Sam2SplitVideoProcessor"]
