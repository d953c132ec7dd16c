#!/usr/bin/env python
"""Time the greedy merge: incremental similarity updates vs recomputing every similarity.

Felzenszwalb regions of a 500x375 image (~300 regions) are merged to 64 with both variants of
icd.data.superpixels.greedy_merge; prints the medians and their ratio and writes them as JSON.
"""
import argparse
import json
import time

import cv2
import numpy as np
import skimage.data

from icd.data.features import colour_position_features
from icd.data.superpixels import greedy_merge, initial_regions, region_means
from icd.data.voc import read_image
from icd.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", help="RGB image (default: scikit-image's astronaut)")
    parser.add_argument("--features", choices=["colour", "random512"], default="random512",
                        help="colour: 5-D colour+position; random512: 512-D like conv5_3")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_superpixels.json")
    args = parser.parse_args()
    image = read_image(args.image) if args.image else skimage.data.astronaut()
    image = cv2.resize(image, (500, 375), interpolation=cv2.INTER_AREA)
    labels = initial_regions(image)
    features = (colour_position_features(image) if args.features == "colour" else
                np.random.default_rng(0).random(image.shape[:2] + (512,), np.float32))
    means, sizes = region_means(labels, features)
    seconds, results = {}, {}
    for name, incremental in (("incremental", True), ("recompute_all", False)):
        greedy_merge(means, sizes, incremental=incremental)  # warm-up (BLAS threads, caches)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = greedy_merge(means, sizes, incremental=incremental)
            times.append(time.perf_counter() - start)
        seconds[name] = float(np.median(times))
    report = dict(image_shape=list(image.shape[:2]), initial_regions=int(labels.max()) + 1,
                  features=args.features, feature_dim=int(means.shape[1]),
                  repeats=args.repeats, median_seconds=seconds,
                  speedup=seconds["recompute_all"] / seconds["incremental"],
                  identical_labels=bool(np.array_equal(results["incremental"],
                                                       results["recompute_all"])))
    print(json.dumps(report, indent=2))
    with atomic_path(args.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
