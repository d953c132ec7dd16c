"""icd: Learning Integral Objects with Intra-Class Discriminator (Fan et al., CVPR 2020) in MXNet/Gluon."""
from setuptools import Extension, find_packages, setup

# Versions verified to install and import together on Python 3.11 from a clean venv
# (docs/release.md section 10). mxnet 1.9.1 needs numpy < 1.24 (np.bool).
# MXNet itself is an extra so that a user picks exactly one build: [cpu] or [gpu] (CUDA 11.2).
INSTALL_REQUIRES = [
    "numpy==1.23.5",
    "gluoncv==0.10.5.post0",
    "opencv-python==4.11.0.86",
    "pydensecrf2==1.1",
    "scikit-image==0.24.0",
    "scipy==1.15.3",
    "matplotlib==3.10.9",
    "Pillow==13.0.0",
    "tqdm>=4.60",
    "PyYAML>=6.0",
    "pycocotools==2.0.11",   # COCO masks (icd-coco-to-voc); checked with numpy 1.23.5
]

# The release's Felzenszwalb (docs/release.md section 11) is float32 throughout: no fused
# multiply-add may change a rounding, so the arithmetic matches the original code's.
FELZENSZWALB = Extension(
    "icd.data._felzenszwalb",
    sources=["icd/data/_felzenszwalb.cpp"],
    language="c++",
    extra_compile_args=["-O2", "-ffp-contract=off"],
)

setup(
    name="icd",
    version="0.1.0",
    description="Intra-Class Discriminator for weakly-supervised semantic segmentation (MXNet/Gluon)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.12",  # the pinned numpy 1.23 / matplotlib 3.10 bound it
    # symbols/ (the release's graph written with mx.sym) is the tests' reference, not part of the
    # library: it stays in the checkout (`python -m symbols.bundle` from its root)
    packages=find_packages(include=["icd", "icd.*"]) + ["icd.experiments"],
    ext_modules=[FELZENSZWALB],
    # experiments/*.yaml ship as icd/experiments/ so that `--config NAME` works after a plain
    # `pip install .` (icd.config.find_config looks there)
    package_dir={"icd.experiments": "experiments"},
    package_data={"icd.experiments": ["*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cpu": ["mxnet==1.9.1"],
        "gpu": ["mxnet-cu112==1.9.1"],
        "test": ["pytest>=7", "scikit-learn==1.5.2"],
    },
    entry_points={"console_scripts": [
        "icd-train = icd.commands.train:main",
        "icd-infer = icd.commands.infer:main",
        "icd-train-seg = icd.commands.train_seg:main",
        "icd-infer-seg = icd.commands.infer_seg:main",
        "icd-seeds = icd.commands.seeds:main",
        "icd-eval = icd.commands.evaluate:main",
        "icd-superpixels = icd.commands.superpixels:main",
        "icd-synthetic = icd.commands.synthetic:main",
        "icd-coco-to-voc = icd.commands.coco_to_voc:main",
        "icd-parity = icd.commands.parity:main",
        "icd-bench = icd.commands.bench:main",
        "icd-launch = icd.commands.launch:main",
        "icd-demo = icd.commands.demo:main",
        "icd-run = icd.commands.run:main",
        "icd-compare = icd.commands.compare:main",
        "icd-pretrained = icd.commands.pretrained:main",
    ]},
)
