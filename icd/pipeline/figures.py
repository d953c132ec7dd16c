"""The demo report's figures: Table 2 as curves, per-class AP, seed overlays, training curves,
and copies of the training and inference pictures (icd.plots draws)."""
from __future__ import annotations

import glob
import os
import shutil
from typing import TYPE_CHECKING, Dict, List, Mapping, Tuple

import numpy as np

from ..config import Config
from ..data.voc import read_list
from ..io import atomic_path, read_json
from ..metrics import percent
from ..model import model_spec
from ..plots import plot_seed_overlays, pyplot, save_figure
from .tables import CAM_ROWS, METHODS, SEED_ROWS

if TYPE_CHECKING:
    from .report import ReportInputs


def write_figures(inputs: ReportInputs, tables: Mapping, figures: str
                  ) -> Tuple[List[str], Dict[str, Dict[str, List[str]]]]:
    """The report's figures: per split the threshold curves, per-class AP and seed overlays;
    the training curves; copies of the training and inference pictures. Returns the models
    with training curves and {"train_demo" | "infer_demo": {model: copied pictures}}."""
    for split in tables:
        _plot_thresholds(tables[split], os.path.join(figures, f"threshold_study_{split}.png"),
                         f"Table 2 as curves, {split} split")
        _plot_class_ap(tables[split], os.path.join(figures, f"class_ap_{split}.png"),
                       f"Per-class pixel AP, {split} split")
        dirs = {name: os.path.join(inputs.results["cam"][split], "seeds", folder)
                for name, folder, _ in CAM_ROWS.values()}
        dirs.update({name.split(" (")[0]: os.path.join(inputs.results["icd"][split], "seeds",
                                                       folder)
                     for name, folder, _, _ in SEED_ROWS.values()})
        plot_seed_overlays(os.path.join(inputs.data, "JPEGImages"),
                           os.path.join(inputs.data, "SegmentationClass"), dirs,
                           read_list(inputs.lists[split])[:4],
                           os.path.join(figures, f"seed_overlays_{split}.png"), inputs.classes)
    trained = _plot_training(inputs.trainings, os.path.join(figures, "training_curves.png"))
    pictures: Dict[str, Dict[str, List[str]]] = {"train_demo": {}, "infer_demo": {}}
    for which in trained:
        for src in sorted(glob.glob(os.path.join(inputs.trainings[which].snapshot, "demo",
                                                 "*.jpg"))):
            dst = os.path.join(figures, "train_demo", which, os.path.basename(src))
            pictures["train_demo"].setdefault(which, []).append(_copy(src, dst))
    for model, results in inputs.results.items():
        for src in sorted(glob.glob(os.path.join(results["train"], "scores_demo", "*.jpg"))):
            dst = os.path.join(figures, "infer_demo", model, os.path.basename(src))
            pictures["infer_demo"].setdefault(model, []).append(_copy(src, dst))
    return trained, pictures


def _plot_thresholds(tables: Mapping, path: str, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ts = [float(t) for t in tables["thresholds"]]
    for ax, metric, label in zip(axes, ("miou", "recall"), ("mIoU, present classes (%)",
                                                             "recall (%)")):
        for key, name in METHODS:
            ax.plot(ts, [100 * row[key][metric] for row in tables["thresholds"].values()],
                    marker="o", label=name)
        ax.set_xlabel("threshold T")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def _plot_class_ap(tables: Mapping, path: str, title: str) -> None:
    plt = pyplot()
    classes = list(tables["present"][1:])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(classes))
    width = 0.8 / len(METHODS)
    for i, (key, name) in enumerate(METHODS):
        values = [np.nan if tables["ap"][key][c] is None else 100 * tables["ap"][key][c]
                  for c in classes]
        ax.bar(x + (i - (len(METHODS) - 1) / 2) * width, values, width,
               label=f"{name} (mAP {percent(tables['map'][key])})")
    ax.set_xticks(x)
    ax.set_xticklabels(classes)
    ax.set_ylabel("pixel AP (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def epoch_records(cfg: Config) -> List[Dict]:
    path = os.path.join(cfg.snapshot, f"{cfg.model}-log.json")
    return read_json(path) if os.path.isfile(path) else []


def _plot_training(trainings: Mapping[str, Config], path: str) -> List[str]:
    """Per-epoch curves of every trained model (from <snapshot>/<model>-log.json)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    shown = []
    for which, cfg in trainings.items():
        records = epoch_records(cfg)
        if not records:
            continue
        epochs = [r["epoch"] + 1 for r in records]
        for ax, key in zip(axes, ("cam_loss", "td_loss", "recall")):
            if key.endswith("_loss") and key not in model_spec(cfg.model).losses:
                continue   # a loss the model does not compute (CAM-only: L_td)
            ax.plot(epochs, [r[key] for r in records], marker=".", label=which)
        shown.append(which)
    for ax, key in zip(axes, ("L_cam (per image)", "L_td (per image)",
                              "top-k label recall (training crops)")):
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return shown


def _copy(src: str, dst: str) -> str:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst
