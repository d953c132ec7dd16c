"""Figures of the evaluation (matplotlib on the Agg backend, written atomically as PNG):
Table 2 as curves, Fig. 5's per-class AP bars, seed overlays."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from .data.voc import read_image, read_mask
from .io import atomic_path
from .metrics import percent
from .visualize import overlay

METHOD_NAMES = {"cam": "CAM", "icd": "Ours (ICD)"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: no side effect on import)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """Write a figure as PNG atomically and release it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)


def plot_threshold_study(study: Mapping[str, Mapping[str, Mapping[str, float]]],
                         path: str) -> None:
    """Table 2 as curves: mIoU and recall (%) against T, CAM vs ICD."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("miou", "recall")):
        for kind, curve in study.items():
            ax.plot([float(t) for t in curve], [100 * v[metric] for v in curve.values()],
                    marker="o", label=METHOD_NAMES.get(kind, kind))
        ax.set_xlabel("threshold T")
        ax.set_ylabel(("mIoU" if metric == "miou" else "recall") + " (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_class_ap(ap: Mapping[str, Mapping[str, object]], path: str) -> None:
    """Fig. 5: per-class AP bars (%), one bar group per class of the results, CAM vs ICD."""
    plt = pyplot()
    classes = list(next(iter(ap.values()))["ap"])
    fig, ax = plt.subplots(figsize=(max(12.0, 0.3 * len(classes)), 3.5))
    width = 0.8 / max(len(ap), 1)
    x = np.arange(len(classes))
    for i, (kind, r) in enumerate(ap.items()):
        ax.bar(x + (i - (len(ap) - 1) / 2) * width,
               [np.nan if r["ap"][c] is None else 100 * r["ap"][c] for c in classes],
               width, label=f"{METHOD_NAMES.get(kind, kind)} (mAP {percent(r['map'])})")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_ylabel("AP (%)")
    ax.legend()
    save_figure(fig, path)


def plot_seed_overlays(image_root: str, gt_root: str, seed_dirs: Mapping[str, str],
                       names: Sequence[str], path: str, classes: Sequence[str]) -> None:
    """One row per image: the image, each seed folder's overlay, the ground truth overlay."""
    plt = pyplot()
    columns = ["image", *seed_dirs, "ground truth"]
    fig, axes = plt.subplots(len(names), len(columns), squeeze=False,
                             figsize=(2.6 * len(columns), 2.2 * len(names)))
    for row, name in zip(axes, names):
        image = read_image(os.path.join(image_root, name + ".jpg"))
        panels = [image] + [overlay(image, read_mask(os.path.join(d, name + ".png")),
                                    classes=classes) for d in seed_dirs.values()]
        panels.append(overlay(image, read_mask(os.path.join(gt_root, name + ".png")),
                              classes=classes))
        for ax, panel, title in zip(row, panels, columns):
            ax.imshow(panel)
            ax.set_title(f"{name}: {title}" if title == "image" else title, fontsize=8)
            ax.axis("off")
    save_figure(fig, path)
