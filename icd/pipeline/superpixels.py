"""icd-run's superpixels step: the superpixels of the training list and of every split's images
(Felzenszwalb + merge on the features of superpixels.features: the ImageNet network's conv5 or
colour and position; icd.features)."""
from __future__ import annotations

from typing import Dict, List

from ..devices import parse_devices
from ..features import superpixels_on_devices
from .settings import PaperSettings
from .steps import Run


def step_superpixels(s: PaperSettings, seed: int, run: Run) -> Dict:
    features = s.pipeline.superpixels.features
    pretrained = s.icd.pretrained if features == "pretrained" else None
    if features == "pretrained" and not pretrained:
        raise ValueError(f"{s.config}: superpixels.features pretrained needs the config's "
                         f"`pretrained:` file (or --set superpixels.features=colour)")
    devices = [str(ctx) for ctx in parse_devices(s.icd.gpus, s.icd.cpus)]
    written = 0
    for data_list in superpixel_lists(s):
        written += len(superpixels_on_devices(s.data.image_root, data_list,
                                              s.folder("superpixels"), pretrained, devices,
                                              s.workers, shard=s.shard))
    return {"written": written}


def superpixel_lists(s: PaperSettings) -> List[str]:
    """The lists whose images need superpixels: training's, then every split's (inference
    refines the bottom-up scores by them, S' of Table 3)."""
    return list(dict.fromkeys([s.data.data_list, *s.splits.values()]))
