"""The dense CRF presets (icd.crf): the seeds' (the release's) and DeepLab's, each passed by the
stage that owns it."""
import dataclasses

import numpy as np
import pytest

from icd import crf, seeds, segment
from icd.crf import DEEPLAB_CRF, SEEDS_CRF, CRFPreset


def test_seed_preset_is_the_releases():
    """docs/release.md section 7."""
    assert SEEDS_CRF == CRFPreset(gaussian=dict(sxy=3, compat=3),
                                  bilateral=dict(sxy=80, srgb=13, compat=10), iterations=10)


def test_deeplab_preset_is_deeplab_largefovs():
    """DeepLab-LargeFOV's inference CRF (Chen et al., ICLR 2015)."""
    assert DEEPLAB_CRF == CRFPreset(gaussian=dict(sxy=3, compat=3),
                                    bilateral=dict(sxy=121, srgb=5, compat=4), iterations=10)


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEEDS_CRF.iterations = 5


@pytest.fixture
def crf_calls(monkeypatch):
    """dense_crf replaced, in the modules that call it, by a recorder returning its input."""
    calls = []

    def record(image_rgb, probabilities, preset):
        calls.append(preset)
        return probabilities

    for module in (seeds, segment):
        monkeypatch.setattr(module, "dense_crf", record)
    return calls


def test_seeds_pass_the_seed_preset(crf_calls):
    image = np.zeros((6, 5, 3), np.uint8)
    seed = np.zeros((6, 5), np.uint8)
    seed[2:4, 1:3] = 1
    seeds.crf_refine(image, seed, num_classes=3)
    assert crf_calls == [SEEDS_CRF] and crf_calls[0] is crf.SEEDS_CRF


def test_segmentation_passes_deeplabs_preset(crf_calls):
    image = np.zeros((6, 5, 3), np.uint8)
    prob = np.full((3, 6, 5), 1 / 3, np.float32)
    segment.predict_labels(image, prob, crf=True)
    assert crf_calls == [DEEPLAB_CRF] and crf_calls[0] is crf.DEEPLAB_CRF
    segment.predict_labels(image, prob, crf=False)
    assert len(crf_calls) == 1


def test_dense_crf_reads_the_preset():
    """Another preset gives other marginals (the preset's kernels reach pydensecrf)."""
    pytest.importorskip("pydensecrf.densecrf")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    prob = rng.dirichlet(np.ones(3), (12, 10)).transpose(2, 0, 1).astype(np.float32)
    one = crf.dense_crf(image, prob, SEEDS_CRF)
    two = crf.dense_crf(image, prob, DEEPLAB_CRF)
    assert one.shape == (3, 12, 10) and not np.allclose(one, two)
