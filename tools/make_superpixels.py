#!/usr/bin/env python
"""Superpixels of a list of images: Felzenszwalb + greedy merge to <= 64 (icd.data.superpixels)."""
import argparse

from icd.distributed import parse_shard
from icd.data.superpixels import make_feature_factory, make_superpixels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-root", required=True, help="folder of <name>.jpg")
    parser.add_argument("--data-list", required=True, help="list file of image names")
    parser.add_argument("--out", required=True, help="folder for <name>.png")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: this one)")
    features = parser.add_mutually_exclusive_group(required=True)
    features.add_argument("--pretrained", metavar="PARAMS",
                          help="backbone checkpoint: merge on its conv5_3 features (release)")
    features.add_argument("--features", choices=["colour"],
                          help="network-free features: centred Lab colour + position")
    parser.add_argument("--overwrite", action="store_true", help="recompute existing PNGs")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: shard I of N of the list")
    args = parser.parse_args()
    written = make_superpixels(args.image_root, args.data_list, args.out,
                               feature_factory=make_feature_factory(args.pretrained),
                               workers=args.workers, overwrite=args.overwrite, shard=args.shard)
    print(f"wrote {len(written)} superpixel maps to {args.out}")


if __name__ == "__main__":
    main()
