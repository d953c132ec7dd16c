#!/usr/bin/env python
"""Seeds from score maps (ORIGINAL_RELEASE.md section 7): <results>/seeds/{crf,sal,nocrf}/<name>.png.

    python tools/make_seeds.py --results snapshot/icd/results --image-root VOC2012/JPEGImages \
        --annotation-root VOC2012/Annotations --data-list VOC2012/train_aug.txt
"""
import argparse
import os

from icd.distributed import parse_shard
from icd.seeds import INFER_SIZE, make_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="results folder holding scores_cam/ etc.")
    parser.add_argument("--image-root", required=True, help="folder of <name>.jpg")
    parser.add_argument("--annotation-root", required=True, help="folder of <name>.xml")
    parser.add_argument("--data-list", required=True, help="list file, one image name per line")
    parser.add_argument("--saliency-root", default=None,
                        help="folder of <name>.png saliency maps: writes seeds/sal, no CRF")
    parser.add_argument("--infer-size", type=int, default=INFER_SIZE)
    parser.add_argument("--workers", type=int, default=min(32, os.cpu_count() or 1))
    parser.add_argument("--no-crf", action="store_true", help="pre-CRF seeds (seeds/nocrf)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing seeds")
    parser.add_argument("--icd-scores", default="scores_icd",
                        help="ICD score folder under --results (scores_icd_bu, scores_icd_bu_sp "
                             "for Table 3; their seeds go to seeds/<variant>_icd_bu...)")
    parser.add_argument("--cam-scores", default="scores_cam")
    parser.add_argument("--out", default=None, help="output folder (default: see --icd-scores)")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: shard I of N of the list")
    args = parser.parse_args()
    summary = make_seeds(args.results, args.image_root, args.annotation_root, args.data_list,
                         saliency_root=args.saliency_root, infer_size=args.infer_size,
                         workers=args.workers, crf=not args.no_crf, overwrite=args.overwrite,
                         icd_folder=args.icd_scores, cam_folder=args.cam_scores,
                         out_dir=args.out, shard=args.shard)
    print(f"{summary['written']} written, {summary['skipped']} kept -> {summary['out_dir']}")


if __name__ == "__main__":
    main()
