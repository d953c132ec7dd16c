"""icd-run's steps in order and the run of them (IRN's run_sample.py): which step reads which,
owns which folders, and depends on which settings; `run_paper` runs the selected ones.

    superpixels -> train_icd, train_cam -> infer -> seeds -> evaluate -> segment -> tables
    (-> compare with repeat N > 1: the steps after superpixels run per training seed into
    seed<k>/, step names `<step>.s<k>`)

Every step is an icd.pipeline.steps step: skipped when done with the same settings and inputs,
rerun with what follows when they change, resumed when interrupted (training from its last
complete checkpoint of the same run, `resume_auto`; per-image steps skip finished files).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

from .compare import step_compare
from .evaluate import step_evaluate
from .infer import step_infer
from .sections import section_settings
from .seeds import step_seeds
from .segment import step_segment
from .settings import BASE_STEPS, PaperSettings
from .steps import Run, Step
from .superpixels import step_superpixels, superpixel_lists
from .tables import step_tables
from .train import step_train, training_settings

ALIASES = {"train": ("train_icd", "train_cam")}
# Expected seconds per step before a finished run's markers give real times (rough, per image
# on 2 CPU cores at width 1/8; only the first run's ETA depends on them).
ESTIMATES = dict(superpixels=5, train_icd=60, train_cam=40, infer=10, seeds=20, evaluate=20,
                 segment=60, tables=5, compare=5)
PER_IMAGE = ("superpixels", "infer", "seeds")


def step_name(base: str, seed: int, s: PaperSettings) -> str:
    return base if len(s.seeds) == 1 or base in ("superpixels", "compare") else \
        f"{base}.s{seed}"


def step_settings(s: PaperSettings, base: str, seed: int) -> Dict:
    """What a step's outputs depend on (devices, processes and shards left out)."""
    stages = s.pipeline
    if base == "superpixels":   # the weights only where the features are the network's: a
        # stand-in the run makes later (the demo's pretrain) must not count as a changed input
        features = stages.superpixels.features
        weights = {"pretrained": s.icd.pretrained} if features == "pretrained" else {}
        return dict(section_settings(stages.superpixels), image_root=s.data.image_root,
                    data_lists=superpixel_lists(s), **weights)
    if base in ("train_icd", "train_cam"):
        return training_settings(s.training(base[6:], seed))
    if base == "infer":
        return dict(splits=s.splits, infer_size=s.icd.infer_size)
    if base == "segment":
        if s.segmentation(seed) is None:
            return {}
        return dict(section_settings(stages.segment), **{label: dict(
            training_settings(cfg), scales=list(cfg.scales), flip=cfg.flip, crf=cfg.crf,
            infer_size=cfg.infer_size) for label, cfg in (
                (label, s.segmentation(seed, label)) for label in stages.segment.labels)})
    if base == "seeds":
        return dict(section_settings(stages.seeds), classes=list(s.data.class_names))
    if base == "evaluate":
        return dict(section_settings(stages.evaluate), gt_root=s.data.gt_root)
    return dict(seeds=s.seeds) if base == "compare" else {}


def step_inputs(s: PaperSettings, base: str) -> Tuple[str, ...]:
    train = ("train_icd", "train_cam") if s.cam is not None else ("train_icd",)
    return {"superpixels": (), "train_icd": ("superpixels",), "train_cam": ("superpixels",),
            "infer": train, "seeds": ("infer",), "evaluate": ("seeds",), "segment": ("seeds",),
            "tables": ("evaluate", "segment"), "compare": ("evaluate",)}[base]


def step_folders(s: PaperSettings, base: str, seed: int) -> Tuple[str, ...]:
    root = s.root(seed)
    results = [os.path.join(root, f"results_{m}") for m in s.models]
    return {"superpixels": (s.folder("superpixels"),),
            "train_icd": (os.path.join(root, "snapshot_icd"),),
            "train_cam": (os.path.join(root, "snapshot_cam"),),
            "infer": tuple(results),
            "seeds": tuple(os.path.join(r, split, "seeds") for r in results
                           for split in s.splits),
            "evaluate": tuple(os.path.join(r, split, "eval") for r in results
                              for split in s.splits),
            "segment": tuple(sorted({os.path.join(root, "segmentation")} | {
                s.segmentation_dirs(seed, label)[0] for label in s.pipeline.segment.labels})),
            "tables": (os.path.join(root, "tables"),),
            "compare": (s.folder("compare"),)}[base]


STEP_FUNCTIONS = {"superpixels": step_superpixels,
                  "train_icd": functools.partial(step_train, "icd"),
                  "train_cam": functools.partial(step_train, "cam"),
                  "infer": step_infer, "seeds": step_seeds, "evaluate": step_evaluate,
                  "segment": step_segment, "tables": step_tables, "compare": step_compare}


def paper_steps(s: PaperSettings) -> List[Step]:
    """Every step of the run in order: superpixels, then per training seed train_icd,
    train_cam, infer, seeds, evaluate, segment, tables; compare when repeat > 1."""
    def make(base: str, seed: int) -> Step:
        inputs = tuple(step_name(d, seed, s) for d in step_inputs(s, base))
        if base == "compare":
            inputs = tuple(step_name("evaluate", k, s) for k in s.seeds)
        return Step(step_name(base, seed, s), functools.partial(STEP_FUNCTIONS[base], s, seed),
                    inputs=inputs, folders=step_folders(s, base, seed),
                    settings=step_settings(s, base, seed), estimate=ESTIMATES[base])

    per_seed = [b for b in BASE_STEPS if b not in ("superpixels", "compare")
                and (b != "train_cam" or s.cam is not None)]
    return [make("superpixels", s.seeds[0])] + \
        [make(base, seed) for seed in s.seeds for base in per_seed] + \
        ([make("compare", s.seeds[0])] if len(s.seeds) > 1 else [])


def select(steps: Sequence[Step], wanted: Optional[Sequence[str]]) -> Optional[List[str]]:
    """The steps named by `wanted` (base names select every seed's; `train` both trainings);
    None: all. Unknown names are an error naming them."""
    if not wanted:
        return None
    bases = [b for w in wanted for b in ALIASES.get(w, (w,))]
    unknown = [b for b in bases if b not in BASE_STEPS and b not in [st.name for st in steps]]
    if unknown:
        raise ValueError(f"--steps: unknown steps {unknown}; choose from train, "
                         f"{', '.join(BASE_STEPS)}")
    return [st.name for st in steps if st.name in bases or st.name.split(".")[0] in bases]


def run_paper(s: PaperSettings, steps: Optional[Sequence[str]] = None, overwrite: bool = False,
              progress_every: float = 30.0) -> Dict[str, Dict]:
    """Run the selected steps of the pipeline; returns {step: {"action", "seconds", ...}}.
    With a shard other than 0/1 only the per-image steps run, with their own markers."""
    all_steps = paper_steps(s)
    selected = select(all_steps, steps)
    s.check_paths({name.split(".")[0] for name in selected or [st.name for st in all_steps]})
    s.check_out(all_steps)
    marker_dir = s.folder("steps")
    if s.shard != (0, 1):
        names = selected or [st.name for st in all_steps]
        other = [n for n in names if n.split(".")[0] not in PER_IMAGE]
        if other:
            raise ValueError(f"--shard: only the per-image steps ({', '.join(PER_IMAGE)}) run "
                             f"in shards; leave out {other} with --steps")
        marker_dir = s.folder("steps", f"shard{s.shard[0]}of{s.shard[1]}")
    # the workers of a training job on several machines (icd-launch) run every step together
    run = Run(all_steps, marker_dir, selected=selected, overwrite=overwrite,
              progress_every=progress_every, root=s.out,
              exclusive=not s.icd.kvstore.startswith("dist"))
    with run.lock():
        if s.shard == (0, 1):
            names = {st.name for st in all_steps}
            run.forget([n for n in run.marker_names()
                        if n.split(".")[0] in BASE_STEPS and n not in names])
        return run.execute()
