"""Every difference between the supported library releases, in one place: transformers 4.57 / 5.x and
huggingface_hub 0.x / 1.x+. Nothing else in the package branches on a version.

The model code imports this file relatively, so it travels to the Hub with it: only torch and transformers are imported
at top level (the Hub's remote-code loader demands every top-level import be installed; huggingface_hub, a dependency
of transformers, is imported where it is used).
"""

import transformers
from transformers import SamModel

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

if hasattr(SamModel, "activation_checkpointing_enable"):  # transformers 5: the name to use, non-reentrant already

    class CheckpointingMixin:
        """Nothing to add on transformers 5."""

else:  # transformers 4.x

    class CheckpointingMixin:
        """transformers 5's `activation_checkpointing_enable` on 4.x, so every caller uses that one name.

        Non-reentrant by default, as in transformers 5: 4.x's re-entrant checkpointing gives LoRA weights inside a
        checkpointed vision layer no gradient when the layer's input (from the frozen patch embedding) needs none.
        """

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            super().gradient_checkpointing_enable({"use_reentrant": False, **(gradient_checkpointing_kwargs or {})})

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            self.gradient_checkpointing_enable(activation_checkpointing_kwargs)


def sam_image_processor_class():
    """transformers 5's `SamImageProcessor` needs torchvision and its `SamImageProcessorPil` does not; 4.57 has only
    the numpy/PIL `SamImageProcessor`."""
    return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def sam_processor(config) -> transformers.SamProcessor:
    """A `SamProcessor` with SAM's standard preprocessing for `config` (a SAM config): images resized and padded to
    `vision_config.image_size`, segmentation maps to the low-resolution mask grid (4x the image-embedding grid)."""
    size = config.vision_config.image_size
    grid = 4 * (size // config.vision_config.patch_size)
    image_processor = sam_image_processor_class()(
        size={"longest_edge": size}, pad_size={"height": size, "width": size},
        mask_size={"longest_edge": grid}, mask_pad_size={"height": grid, "width": grid},
    )
    return transformers.SamProcessor(image_processor=image_processor)
