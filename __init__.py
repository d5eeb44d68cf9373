"""sam-split: SAM with separate q/k/v vision attention, LoRA-ready (see README.md).

Importing this folder as a package registers the classes with transformers' Auto classes, so local checkpoints load
with `AutoModel.from_pretrained(path)` without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration

from .configuration_sam_split import SamSplitConfig
from .modeling_sam_split import SamSplitModel

AutoConfig.register(SamSplitConfig.model_type, SamSplitConfig, exist_ok=True)
AutoModel.register(SamSplitConfig, SamSplitModel, exist_ok=True)
AutoModelForMaskGeneration.register(SamSplitConfig, SamSplitModel, exist_ok=True)

__all__ = ["SamSplitConfig", "SamSplitModel"]
