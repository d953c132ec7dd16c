#!/usr/bin/env python
"""Write the synthetic VOC-layout dataset (icd.data.synthetic)."""
import argparse

from icd.data.synthetic import DEFAULT_CLASSES, make_synthetic_voc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="dataset folder (VOC layout)")
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=50)
    parser.add_argument("--size", type=int, default=112, help="image side (varies by ±15%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                        help="VOC class names to use")
    args = parser.parse_args()
    names = make_synthetic_voc(args.out, num_train=args.num_train, num_val=args.num_val,
                               size=args.size, seed=args.seed, classes=args.classes)
    print(", ".join(f"{len(v)} {k}" for k, v in names.items()), "images in", args.out)


if __name__ == "__main__":
    main()
