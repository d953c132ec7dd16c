#!/usr/bin/env python
"""Time the superpixel steps on 500x375 images and write the medians as JSON.

1. Felzenszwalb: ours (icd.data.superpixels.initial_regions, the release's computation in C++)
   vs scikit-image's `felzenszwalb` with the same parameters, per image, and their ratio.
2. The greedy merge of the first image's regions to 64: incremental similarity updates vs
   recomputing every similarity (icd.data.superpixels.greedy_merge).
"""
import argparse
import time
from typing import Callable, List

import cv2
import numpy as np
import skimage.data
from skimage.segmentation import felzenszwalb

from icd.data.superpixels import colour_position_features
from icd.data.superpixels import (FELZENSZWALB_MIN_SIZE, FELZENSZWALB_SCALE, FELZENSZWALB_SIGMA,
                                  greedy_merge, initial_regions, region_means)
from icd.data.voc import read_image
from icd.io import write_json

SIZE = (500, 375)  # (W, H), a typical VOC image
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's colour photos


def median_seconds(func: Callable[[], object], repeats: int) -> float:
    """Median wall time of func() over `repeats` calls, after one warm-up call."""
    func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def load_images(paths: List[str]) -> List[tuple]:
    """(name, (375, 500, 3) uint8 RGB) pairs: the given files, else scikit-image's photos."""
    images = [(p, read_image(p)) for p in paths] or \
        [(n, getattr(skimage.data, n)()) for n in DEFAULT_IMAGES]
    return [(name, cv2.resize(image, SIZE, interpolation=cv2.INTER_AREA))
            for name, image in images]


def bench_felzenszwalb(images: List[tuple], repeats: int) -> List[dict]:
    rows = []
    for name, image in images:
        ours = median_seconds(lambda: initial_regions(image), repeats)
        theirs = median_seconds(lambda: felzenszwalb(
            image, scale=FELZENSZWALB_SCALE, sigma=FELZENSZWALB_SIGMA,
            min_size=FELZENSZWALB_MIN_SIZE), repeats)
        rows.append(dict(image=name, regions=int(initial_regions(image).max()) + 1,
                         ours_seconds=ours, skimage_seconds=theirs, skimage_over_ours=theirs / ours))
    return rows


def bench_merge(image: np.ndarray, features: str, repeats: int) -> dict:
    labels = initial_regions(image)
    values = (colour_position_features(image) if features == "colour" else
              np.random.default_rng(0).random(image.shape[:2] + (512,), np.float32))
    means, sizes = region_means(labels, values)
    seconds, results = {}, {}
    for name, incremental in (("incremental", True), ("recompute_all", False)):
        def merge(incremental=incremental):
            return greedy_merge(means, sizes, incremental=incremental)
        seconds[name] = median_seconds(merge, repeats)
        results[name] = merge()
    return dict(initial_regions=int(labels.max()) + 1, features=features,
                feature_dim=int(means.shape[1]), median_seconds=seconds,
                speedup=seconds["recompute_all"] / seconds["incremental"],
                identical_labels=bool(np.array_equal(results["incremental"],
                                                     results["recompute_all"])))


def bench_sizes(image: np.ndarray, sizes: List[str]) -> List[dict]:
    """One run of each step at each size "WxH" of `image`: wall and CPU seconds (the CPU time of
    this process, all its threads: steadier than wall time on a shared machine)."""
    rows = []
    for size in sizes:
        w, h = (int(v) for v in size.lower().split("x"))
        scaled = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)
        seconds, cpu_seconds, results = {}, {}, {}
        steps = (("felzenszwalb", lambda: initial_regions(scaled)),
                 ("features_and_means", lambda: region_means(
                     results["felzenszwalb"], colour_position_features(scaled))),
                 ("merge", lambda: greedy_merge(*results["features_and_means"])))
        for step, run in steps:
            wall, cpu = time.perf_counter(), time.process_time()
            results[step] = run()
            seconds[step] = time.perf_counter() - wall
            cpu_seconds[step] = time.process_time() - cpu
        rows.append(dict(size=size, pixels=w * h, regions=int(results["felzenszwalb"].max()) + 1,
                         seconds=seconds, cpu_seconds=cpu_seconds))
    for row in rows:
        row["pixels_ratio"] = row["pixels"] / rows[0]["pixels"]
        row["cpu_seconds_ratio"] = {k: v / rows[0]["cpu_seconds"][k]
                                    for k, v in row["cpu_seconds"].items()}
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", nargs="*", default=[],
                        help="image files (default: scikit-image's " + ", ".join(DEFAULT_IMAGES)
                        + ")")
    parser.add_argument("--features", choices=["colour", "random512"], default="random512",
                        help="merge features; colour: 5-D colour+position; random512: 512-D "
                        "like conv5_3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=["500x375", "1000x750", "2000x1500"],
                        metavar="WxH", help="image sizes of part 3 (e.g. add 6000x4000: "
                        "minutes; nothing to skip it)")
    parser.add_argument("--out", default="bench_superpixels.json")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    rows = bench_felzenszwalb(images, args.repeats)
    ratios = [row["skimage_over_ours"] for row in rows]
    report = dict(image_shape=[SIZE[1], SIZE[0]], repeats=args.repeats,
                  felzenszwalb=dict(per_image=rows, median_skimage_over_ours=float(
                      np.median(ratios))),
                  merge=bench_merge(images[0][1], args.features, args.repeats))
    for row in rows:
        print(f"felzenszwalb {row['image']}: {row['regions']} regions, ours "
              f"{row['ours_seconds'] * 1e3:.1f} ms, scikit-image {row['skimage_seconds'] * 1e3:.1f}"
              f" ms ({row['skimage_over_ours']:.2f}x)")
    report["by_size"] = bench_sizes(images[0][1], args.sizes)
    for row in report["by_size"]:
        print(f"{row['size']}: {row['regions']} regions, CPU "
              + ", ".join(f"{k} {v:.2f} s ({row['cpu_seconds_ratio'][k]:.1f}x)"
                          for k, v in row["cpu_seconds"].items())
              + f"; pixels {row['pixels_ratio']:.0f}x")
    merge = report["merge"]
    print(f"merge {merge['initial_regions']} -> 64 regions: incremental "
          f"{merge['median_seconds']['incremental'] * 1e3:.1f} ms, recompute all "
          f"{merge['median_seconds']['recompute_all'] * 1e3:.1f} ms ({merge['speedup']:.1f}x)")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
