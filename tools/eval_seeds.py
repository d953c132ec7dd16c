#!/usr/bin/env python
"""Evaluate seeds (mIoU, Table 3) and score maps (threshold study, Table 2; pixel AP, Table 1).

    python tools/eval_seeds.py --results snapshot/icd/results \
        --gt-root VOC2012/SegmentationClassAug --data-list VOC2012/train_aug.txt \
        --annotation-root VOC2012/Annotations --image-root VOC2012/JPEGImages
"""
import argparse
import os

from icd.evaluate import THRESHOLDS, evaluate
from icd.seeds import INFER_SIZE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="results folder")
    parser.add_argument("--gt-root", required=True, help="SegmentationClass(Aug) folder")
    parser.add_argument("--data-list", required=True)
    parser.add_argument("--seeds", nargs="*", default=None,
                        help="seed folders, relative to --results unless absolute "
                             "(default: every folder under <results>/seeds)")
    parser.add_argument("--annotation-root", default=None,
                        help="folder of <name>.xml: enables the threshold study and pixel AP")
    parser.add_argument("--image-root", default=None, help="folder of <name>.jpg: seed overlays")
    parser.add_argument("--cam-scores", default="scores_cam")
    parser.add_argument("--icd-scores", default="scores_icd")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    parser.add_argument("--infer-size", type=int, default=INFER_SIZE)
    parser.add_argument("--overlays", type=int, default=4, help="images in seed_overlays.png")
    parser.add_argument("--workers", type=int, default=min(32, os.cpu_count() or 1))
    parser.add_argument("--out", default=None, help="report folder (default <results>/eval)")
    args = parser.parse_args()
    out = args.out or os.path.join(args.results, "eval")
    evaluate(args.results, args.gt_root, args.data_list, seed_dirs=args.seeds,
             annotation_root=args.annotation_root, image_root=args.image_root, out_dir=out,
             infer_size=args.infer_size, thresholds=args.thresholds,
             folders={"cam": args.cam_scores, "icd": args.icd_scores}, workers=args.workers,
             num_overlays=args.overlays)
    print(open(os.path.join(out, "eval.md"), encoding="utf-8").read())


if __name__ == "__main__":
    main()
