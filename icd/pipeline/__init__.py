"""icd-run, the paper's whole pipeline on a dataset as resumable steps, and the demo around it.

    superpixels -> train_icd, train_cam -> infer -> seeds -> evaluate -> segment -> tables
    (-> compare over the training seeds of --repeat N)

steps.py       the generic step runner: Step, Run, markers, fingerprints by content, the ETA
sections.py    the typed `pipeline:` section, one dataclass per stage: a stage's new setting is a
               field there (declared once with help, choices and range, checked at load)
settings.py    PaperSettings: that section, the overrides, the devices, the dataset (DataPaths)
               and the training configs of ICD, the CAM baseline and DeepLab derived from them
superpixels.py train.py infer.py seeds.py evaluate.py segment.py compare.py tables.py
               one file per stage: step_<stage>(settings, seed, run) -> a JSON-able summary;
               tables.py serves icd-run's tables and the demo's report alike
paper.py       the steps in order, what each reads, owns and depends on; run_paper
demo.py        the demo: icd-run on the synthetic set with its data, an ImageNet stand-in and a
               report (report.py, claims.py, figures.py)
"""
