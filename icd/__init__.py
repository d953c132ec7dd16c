"""icd: Intra-Class Discriminator (Fan et al., CVPR 2020) as MXNet/Gluon blocks.

Importing the package has no side effects; sub-packages are imported on use.
"""
__version__ = "0.1.0"
