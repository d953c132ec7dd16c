"""The two-level bootstrap of icd-compare (icd.stats): one model per side is the image
bootstrap, a spread over training seeds widens the interval."""
import numpy as np
import pytest

from icd import stats


def _confusions(rng, num_images, hits):
    """(N, 3, 3) confusions of images with 100 pixels of labels 0..2, `hits` of them right."""
    out = np.zeros((num_images, 3, 3))
    for i in range(num_images):
        for c in range(3):
            right = rng.binomial(100, hits)
            out[i, c, c] = right
            out[i, c, (c + 1) % 3] = 100 - right
    return out


def test_one_model_per_side_is_the_image_bootstrap():
    rng = np.random.default_rng(0)
    a, b = _confusions(rng, 12, 0.8), _confusions(rng, 12, 0.7)
    classes = [0, 1, 2]
    result = stats.compare_runs([a], [b], classes, resamples=200, seed=5)
    reference = stats.compare(stats.miou_statistic(a, classes), stats.miou_statistic(b, classes),
                              stats.resample_weights(12, 200, 5))
    for key in ("value", "reference", "difference", "low", "high"):
        assert result[key] == pytest.approx(reference[key])
    assert result["verdict"] == reference["verdict"] == "PASS"
    assert result["levels"]["training seeds"]["share"] == pytest.approx(0.0, abs=1e-12)
    assert result["levels"]["images"]["share"] == pytest.approx(1.0)


def test_spread_over_training_seeds_widens_the_interval():
    rng = np.random.default_rng(1)
    images_only = [_confusions(np.random.default_rng(2), 20, 0.75)]
    spread = [_confusions(rng, 20, h) for h in (0.6, 0.75, 0.9)]
    reference = [_confusions(rng, 20, 0.7)]
    narrow = stats.compare_runs(images_only, reference, [0, 1, 2], resamples=300)
    wide = stats.compare_runs(spread, reference, [0, 1, 2], resamples=300)
    assert wide["high"] - wide["low"] > 2 * (narrow["high"] - narrow["low"])
    assert wide["levels"]["training seeds"]["share"] > 0.5
    assert wide["value"] == pytest.approx(np.mean(wide["per_model"]["better"]))
    with pytest.raises(ValueError, match="different image sets"):
        stats.compare_runs(spread, [_confusions(rng, 5, 0.7)], [0, 1, 2])
