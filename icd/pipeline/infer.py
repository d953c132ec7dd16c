"""icd-run's infer step: the score maps of every trained model on every split (icd.infer, the
release's results layout)."""
from __future__ import annotations

import dataclasses
from typing import Dict

from ..runs import checkpoint_path
from ..devices import parse_devices
from ..infer import infer
from .settings import PaperSettings
from .steps import Run


def step_infer(s: PaperSettings, seed: int, run: Run) -> Dict:
    counts = {}
    for model in s.models:
        cfg = s.training(model, seed)
        contexts = parse_devices(cfg.gpus, cfg.cpus)
        final = checkpoint_path(cfg, cfg.num_epoch - 1)
        for split, data_list in s.splits.items():
            counts[f"{model}/{split}"] = len(infer(
                dataclasses.replace(cfg, data_list=data_list), final,
                s.results(seed, model, split), contexts, s.shard))
    return {"images": counts}
