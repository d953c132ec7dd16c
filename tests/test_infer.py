"""ICD inference (icd.infer): non-finite weights and scores are refused, the next batch is
queued before one is read back, the pipelined loop writes the serial loop's score maps."""
import os

import mxnet as mx
import numpy as np
import pytest

from icd import devices as devices_module
from icd import infer as infer_module
from icd.checkpoint import (checkpoint_path, initialize, load_checkpoint, read_params,
                            save_checkpoint)
from icd.data.dataset import infer_loader
from icd.data.voc import read_list
from icd.infer import OUTPUT_FOLDERS, infer
from icd.model import model_from_config
from icd.seeds import make_seeds

from helpers import DEVICES, QueueOrder


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


# ---------------------------------------------------------------------------------------------
# Pipelined inference

def test_inference_queues_the_next_batch_before_reading_one_back(tiny_config, tmp_path,
                                                                monkeypatch):
    cfg = tiny_config(infer_batch_size=2, num_workers=0)
    net = model_from_config(cfg)
    initialize(net, [mx.cpu(0)])
    params = str(tmp_path / "model.params")
    save_checkpoint(net, params)
    order = QueueOrder(monkeypatch, infer_module, "_queue",
                       lambda result: [a for device in result[1] for a in device.values()])
    names = infer(cfg, params, str(tmp_path / "results"), DEVICES)
    order.assert_overlapped(-(-len(names) // 2))


def test_pipelined_score_maps_equal_the_serial_loops(tiny_config, tiny_voc, tmp_path):
    """icd.infer's files hold exactly what the network returns for the loader's batches."""
    cfg = tiny_config(infer_batch_size=3, num_workers=0)
    net = model_from_config(cfg)
    initialize(net, [mx.cpu(0)])
    params = str(tmp_path / "model.params")
    save_checkpoint(net, params)
    out = str(tmp_path / "results")
    names = infer(cfg, params, out, [mx.cpu(1), mx.cpu(2)])
    assert names == read_list(cfg.data_list)

    reference = model_from_config(cfg)
    load_checkpoint(reference, params, [mx.cpu(1), mx.cpu(2)])
    reference.hybridize(static_alloc=True)
    loader = infer_loader(cfg.image_root, cfg.superpixel_root, cfg.annotation_root,
                          cfg.data_list, image_size=cfg.infer_size, batch_size=3,
                          classes=cfg.class_names)
    seen = set()
    for data, superpixel, label, index, _ in loader:
        parts = devices_module.split_batch(
            {"data": data, "superpixel": superpixel, "label": label}, [mx.cpu(1), mx.cpu(2)])
        outs = [dict(zip(reference.output_names, reference(
            part["data"], part["superpixel"], part["label"],
            mx.nd.ones((1,), ctx=part["data"].context)))) for part in parts]
        for j, i in enumerate(index.asnumpy()):
            name = names[int(i)]
            if name in seen:
                continue
            seen.add(name)
            present = np.flatnonzero(label[j].asnumpy())
            for key, folder in OUTPUT_FOLDERS.items():
                if key not in outs[0]:
                    continue
                expected = np.concatenate([o[key].asnumpy() for o in outs])[j, present]
                np.testing.assert_array_equal(
                    np.load(os.path.join(out, folder, name + ".npy")), expected)
    assert seen == set(names)
