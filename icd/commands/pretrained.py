"""Make the release's ImageNet file `vgg16_20M.params` from MXNet's model-zoo VGG16.

Examples:
  icd-pretrained --from modelzoo:vgg16 --out data/vgg16_20M.params
  icd-pretrained --from ~/Downloads/vgg16-e660d456.params --out data/vgg16_20M.params
  icd-pretrained --from modelzoo:vgg16 --root /data/mxnet-models --out data/vgg16_20M.params
`modelzoo:vgg16` takes `vgg16-<hash>.params` from the model store's cache folder (--root), or
downloads it there (network); a path converts a model-zoo file you already have (offline).
conv1_1..conv5_3 are renamed, the input convention (RGB / 255 normalised by ImageNet's mean and
std) is folded into conv1_1 for the release's RGB 0..255 - 127, fc6/fc7 are reduced to
DeepLab-LargeFOV's 1024 channels by decimation (docs/release.md section 13). Beside the file,
<out>.json records the source, its SHA-256 and the rule. These are not the release's weights
(another ImageNet training, another framework's preprocessing): paper numbers may differ.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from ..model.pretrained import MODELZOO, VGG16_RELEASE, convert_vgg16, default_root, store_file
from .runner import Parser, run


def build_parser() -> Parser:
    parser = Parser(__doc__, prog="icd-pretrained")
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help=f"{MODELZOO}:{VGG16_RELEASE.store_name} (the model store's file) or "
                             f"the path of a model-zoo {VGG16_RELEASE.store_name} .params file "
                             f"(required)")
    parser.add_argument("--out", required=True,
                        help=f"the file to write, e.g. {VGG16_RELEASE.file} (required)")
    parser.add_argument("--root", default=None,
                        help=f"the model store's cache folder (default: {default_root()}, "
                             f"$MXNET_HOME/models when set)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out file (default: refuse)")
    return parser


def source_file(source: str, root: Optional[str]) -> str:
    """The model-zoo file `--from` names: the model store's (`modelzoo:vgg16`) or a path."""
    if source.startswith(f"{MODELZOO}:") or source == MODELZOO:
        if source not in (MODELZOO, f"{MODELZOO}:{VGG16_RELEASE.store_name}"):
            raise ValueError(f"--from {source}: the converter makes the release's VGG16 file; "
                             f"use {MODELZOO}:{VGG16_RELEASE.store_name} or a path")
        return store_file(VGG16_RELEASE, root)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: model-zoo file not found (--from)")
    return source


def _convert(args: argparse.Namespace) -> int:
    if os.path.exists(args.out) and not args.overwrite:
        raise ValueError(f"{args.out}: exists; --overwrite replaces it")
    source = source_file(args.source, args.root)
    record = convert_vgg16(source, args.out)
    print(f"{args.out}: made from {record['source']} ({record['made_from']}, "
          f"{record['source_sha256']}); record {args.out}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser(), _convert, argv)
