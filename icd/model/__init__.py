"""The models: the ICD network (icd_net) and the DeepLab segmentation networks (deeplab), all
built by name through one registry (`build_model("vgg16_icd")`, `build_model("vgg16_largefov")`)."""
from .backbone import VGG16DeepLab, scaled
from .icd_net import CAMNet, ICDNet, named_losses
from .deeplab import DeepLabVGG16, ResNet101LargeFOV, resnet101_largefov, vgg16_aspp, \
    vgg16_largefov
from .registry import (MODELS, build_model, model_from_config, model_options, model_spec,
                       models_of, register)

__all__ = ["VGG16DeepLab", "CAMNet", "ICDNet", "DeepLabVGG16", "ResNet101LargeFOV",
           "vgg16_largefov", "vgg16_aspp", "resnet101_largefov", "MODELS", "build_model",
           "model_from_config", "model_options", "model_spec", "models_of", "named_losses",
           "register", "scaled"]
