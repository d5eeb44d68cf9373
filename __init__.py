"""sam-split: SAM, SAM-HQ and SAM 2 (image and video) with separate q/k/v vision attention, LoRA-ready (see README.md).

Importing this folder as a package registers the classes with transformers' Auto classes, so local checkpoints load
with `AutoModel.from_pretrained(path)` without `trust_remote_code`. (Each modeling file also makes the mask-generation
pipeline recognise its model: `compat.register_for_mask_generation`.)
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration

from .configuration_sam2_split import Sam2SplitConfig
from .configuration_sam2_video_split import Sam2VideoSplitConfig
from .configuration_sam_hq_split import SamHQSplitConfig
from .configuration_sam_split import SamSplitConfig
from .modeling_sam2_split import Sam2SplitModel
from .modeling_sam2_video_split import Sam2VideoSplitModel
from .modeling_sam_hq_split import SamHQSplitModel
from .modeling_sam_split import SamSplitModel

for _config_class, _model_class in ((SamSplitConfig, SamSplitModel), (SamHQSplitConfig, SamHQSplitModel),
                                    (Sam2SplitConfig, Sam2SplitModel)):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForMaskGeneration.register(_config_class, _model_class, exist_ok=True)
# The tracker: no mask-generation model (its `forward` takes an inference session, not an image).
AutoConfig.register(Sam2VideoSplitConfig.model_type, Sam2VideoSplitConfig, exist_ok=True)
AutoModel.register(Sam2VideoSplitConfig, Sam2VideoSplitModel, exist_ok=True)

__all__ = ["Sam2SplitConfig", "Sam2SplitModel", "Sam2VideoSplitConfig", "Sam2VideoSplitModel", "SamHQSplitConfig",
           "SamHQSplitModel", "SamSplitConfig", "SamSplitModel"]
