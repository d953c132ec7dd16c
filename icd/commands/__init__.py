"""The command-line tools, one module per tool, each with `main(argv) -> exit status`.

    command          module       checkout wrapper             what it does
    icd-run          run          tools/run_pipeline.py        the paper's pipeline from one config
    icd-demo         demo         tools/demo.py                the demo on the synthetic dataset
    icd-pretrained   pretrained   tools/make_pretrained.py     vgg16_20M.params from a model zoo
    icd-synthetic    synthetic    tools/make_synthetic_voc.py  the synthetic dataset (VOC layout)
    icd-coco-to-voc  coco_to_voc  tools/coco_to_voc.py         MS COCO instances to the VOC layout
    icd-superpixels  superpixels  tools/make_superpixels.py    Felzenszwalb + merge to 64 regions
    icd-train        train        tools/train_icd.py           ICD, the CAM baseline, an ablation
    icd-infer        infer        tools/infer_scores.py        score maps of a checkpoint
    icd-seeds        seeds        tools/make_seeds.py          seeds from score maps (+ CRF, sal.)
    icd-eval         evaluate     tools/eval_seeds.py          seed mIoU, thresholds, pixel AP
    icd-train-seg    train_seg    tools/train_seg.py           DeepLab on the seeds
    icd-infer-seg    infer_seg    tools/infer_seg.py           DeepLab's predictions and mIoU
    icd-compare      compare      tools/compare.py             two result folders, with intervals
    icd-parity       parity       tools/check_parity.py        our model against a release bundle
    icd-bench        bench        tools/bench_step.py          time and memory of a training step
    icd-launch       launch       tools/launch.py              training on several machines

setup.py installs each `icd.commands.<module>:main` as its command; the wrappers run the same
`main` from a checkout (`python tools/X.py`). Argument parsing lives here, so tests call
`main([...])` in-process; `icd.commands.runner` turns every failure into one line
`error: <file or flag>: <problem>` and an exit status, and shows the module docstring as --help.
"""
