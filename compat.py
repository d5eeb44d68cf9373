"""The model side's differences between the supported transformers releases (4.57 and 5.x), in one place: no other
model file branches on a version. The tools keep theirs in `tools/compat.py`.

The model code imports this file relatively, so it is published with every model repository: it imports only torch
and transformers (transformers' remote-code loader checks that every module imported anywhere in the file, at top level
or inside a function, is installed).
"""

from transformers import SamModel

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


def attention_function(implementation: str, eager):
    """The attention function transformers registers for `implementation` (`config._attn_implementation`), or `eager`
    for "eager": 5.x looks it up with `get_interface`, 4.57 by indexing (as stock SAM 2 does on each)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    return eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]


def register_for_mask_generation(model_type: str, class_name: str) -> None:
    """Make transformers' mask-generation pipeline recognise a twin, so it stops logging "<Twin> is not supported for
    mask-generation" although it runs it. The pipeline checks the model's class name against the built-in table
    `MODEL_FOR_MASK_GENERATION_MAPPING_NAMES` (a dict in 4.57 and 5.x); `AutoModelForMaskGeneration.register` does not
    add to that table, and remote code never calls it. Adding our entry is all it takes; where a release no longer has
    the table, nothing is done (the pipeline then only logs)."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, "MODEL_FOR_MASK_GENERATION_MAPPING_NAMES", None)
    if isinstance(names, dict):
        names.setdefault(model_type, class_name)


def accept_any_image_processor(processor_class: type) -> type:
    """Let `processor_class` (a `ProcessorMixin`) take and load any image processor, e.g. one from the repository's
    own `auto_map`. 4.57 checks the image processor against, and loads it as, the class attribute
    `image_processor_class` (`Sam2Processor`: the torchvision-only `Sam2ImageProcessorFast`), so it is widened to
    "AutoImageProcessor" there; 5.x already loads it with `AutoImageProcessor` and checks only for an image processor,
    and warns that the attribute is deprecated, so it is not set there."""
    from transformers import processing_utils

    if not hasattr(processing_utils, "MODALITY_TO_AUTOPROCESSOR_MAPPING"):  # 4.x
        processor_class.image_processor_class = "AutoImageProcessor"
    return processor_class
