"""ICD inference (icd.infer): non-finite weights and scores are refused, the next batch is
queued before one is read back, the pipelined loop writes the serial loop's score maps."""
import os

import mxnet as mx
import numpy as np
import pytest

from icd.checkpoint import checkpoint_path, read_params
from icd.infer import infer
from icd.seeds import make_seeds


def test_non_finite_weights_and_scores_are_refused(trained, tmp_path):
    values = read_params(checkpoint_path(trained, 0))
    key = sorted(values)[3]
    values[key][0] = np.nan
    broken = str(tmp_path / "nan-0000.params")
    mx.nd.save(broken, values)
    results = str(tmp_path / "results")
    with pytest.raises(ValueError, match=rf"{broken}: tensor {key}: \d+ of \d+ values are NaN"):
        infer(trained, broken, results, [mx.cpu()])
    infer(trained, checkpoint_path(trained, 0), results, [mx.cpu()])
    name = sorted(os.listdir(os.path.join(results, "scores_icd")))[0]
    score = os.path.join(results, "scores_icd", name)
    array = np.load(score)
    array[0, 0, 0] = np.inf
    np.save(score, array)
    with pytest.raises(ValueError, match=rf"{score}: scores: 1 of \d+ values are NaN or inf"):
        make_seeds(results, trained.image_root, trained.annotation_root, trained.data_list,
                   crf=False)


def test_inference_refuses_non_finite_scores(trained, tmp_path):
    """Finite weights so large that the CAM overflows: nothing non-finite is written."""
    values = read_params(checkpoint_path(trained, 0))
    values["arg:fc8_weight"][:] = 1e38
    values["arg:fc8_bias"][:] = 3e38
    huge = str(tmp_path / "huge-0000.params")
    mx.nd.save(huge, values)
    results = str(tmp_path / "results")
    with pytest.raises(ValueError, match=r"scores_\w+/\w+\.npy: scores of \w+: \d+ of \d+ "
                                         r"values are NaN or infinite"):
        infer(trained, huge, results, [mx.cpu()])
    assert not any(f.endswith(".npy") for _, _, files in os.walk(results) for f in files)
