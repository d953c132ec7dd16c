"""The command-line tools, one module per tool, each with `main(argv) -> exit status`.

    icd-train (tools/train_icd.py)          train ICD, the CAM baseline or an ablation
    icd-infer (tools/infer_scores.py)       score maps of a checkpoint
    icd-seeds (tools/make_seeds.py)         seeds from score maps (+ CRF, + saliency)
    icd-eval (tools/eval_seeds.py)          seed mIoU, threshold study, pixel AP
    icd-superpixels (tools/make_superpixels.py)
    icd-synthetic (tools/make_synthetic_voc.py)
    icd-coco-to-voc (tools/coco_to_voc.py)  MS COCO instances to the VOC layout
    icd-parity (tools/check_parity.py)      check our model against a release bundle
    icd-bench (tools/bench_step.py)         time and memory of a training step
    icd-launch (tools/launch.py)            a training on several machines (MXNet's launcher)

Argument parsing lives here, so tests call `main([...])` in-process; `icd.commands.runner`
turns every failure into one line `error: <file or flag>: <problem>` and an exit status.
"""
