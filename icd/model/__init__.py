"""The ICD network: VGG16-DeepLab backbone, CAM head and the intra-class discriminator branch."""
from .backbone import VGG16DeepLab, scaled
from .icd_net import MODELS, CAMNet, ICDNet, build_model

__all__ = ["VGG16DeepLab", "CAMNet", "ICDNet", "MODELS", "build_model", "scaled"]
