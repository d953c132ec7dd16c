"""ICD inference (icd.infer): the network loaded once for every inference command
(`inference_network`), a forward without the training schedule's `warm`, non-finite weights and
scores refused, the next batch queued before one is read back, the pipelined loop writing the
serial loop's score maps."""
import os

import mxnet as mx
import numpy as np
import pytest

from icd import devices as devices_module, infer as infer_module
from icd.checkpoint import load_checkpoint, read_params, save_checkpoint
from icd.config import load_config
from icd.data.dataset import DataPaths, infer_loader
from icd.data.voc import read_list
from icd.infer import OUTPUT_FOLDERS, infer
from icd.model import build_model, model_from_config
from icd.model.pretrained import initialize
from icd.runs import checkpoint_path
from icd.seeds import SeedSettings, make_seeds

from helpers import DEVICES, QueueOrder

SCORES = ("cam", "icd_bu", "icd_bu_sp", "icd_td")


def _inputs(num_classes, ctx=mx.cpu(), size=32):
    rng = np.random.default_rng(0)
    label = np.zeros((2, num_classes), np.float32)
    label[0, 1] = label[1, [0, 2]] = 1
    return {"data": mx.nd.array(rng.uniform(0, 255, (2, 3, size, size)), ctx=ctx),
            "superpixel": mx.nd.array(rng.integers(0, 5, (2, size, size)), ctx=ctx),
            "label": mx.nd.array(label, ctx=ctx)}


@pytest.fixture
def icd_net():
    net = build_model("vgg16_icd", num_classes=3, width=1 / 16)
    net.initialize(mx.init.Normal(0.05))
    return net


def test_the_inference_graph_has_no_warm_input(icd_net):
    """warm, the top-down warm-up weight of a training step, is no input of inference."""
    assert "warm" in icd_net.input_names and "warm" not in icd_net.infer_input_names
    outputs = icd_net(*[mx.sym.var(n) for n in icd_net.infer_input_names])
    assert len(outputs) == len(SCORES)
    assert "warm" not in mx.sym.Group(list(outputs)).list_arguments()


@pytest.mark.parametrize("hybridize", [False, True])
def test_scores_without_warm_are_the_training_graphs(icd_net, hybridize):
    """Without `warm` the forward returns the four score maps, those of the training graph's
    forward (any warm), and no losses."""
    inputs = _inputs(3)
    trained_graph = build_model("vgg16_icd", num_classes=3, width=1 / 16)
    trained_graph.initialize()
    for name, param in icd_net.collect_params().items():
        trained_graph.collect_params()[name].set_data(param.data())
    if hybridize:
        icd_net.hybridize(static_alloc=True)
        trained_graph.hybridize(static_alloc=True)
    scores = icd_net(*[inputs[n] for n in icd_net.infer_input_names])
    full = trained_graph(*[inputs[n] for n in ("data", "superpixel", "label")],
                         mx.nd.full((1,), 0.3))
    assert len(scores) == len(SCORES) and len(full) == len(SCORES) + 1
    for name, score, reference in zip(SCORES, scores, full):
        np.testing.assert_array_equal(score.asnumpy(), reference.asnumpy(), err_msg=name)


def test_infer_queues_the_scores_without_warm(icd_net):
    """icd.infer's forward feeds data, superpixel and label only, and gets score maps."""
    icd_net.hybridize(static_alloc=True)
    inputs = _inputs(3)
    batch = [inputs["data"], inputs["superpixel"], inputs["label"], mx.nd.array([0, 1]),
             mx.nd.array([[32, 32], [32, 32]])]
    _, outputs = infer_module._queue(icd_net, batch, [mx.cpu()])
    assert list(outputs[0]) == list(SCORES)
    assert all(o.dtype == np.float32 for o in outputs[0].values())


def test_inference_network_loads_the_checkpoint(tmp_path):
    """`inference_network`: the config's network, the checkpoint's values, hybridized."""
    cfg = load_config(None, model="vgg16_icd", width=0.0625)
    net = model_from_config(cfg)
    net.initialize(mx.init.Normal(0.05))
    params = str(tmp_path / "vgg16_icd-0000.params")
    save_checkpoint(net, params)
    loaded = infer_module.inference_network(cfg, params, [mx.cpu()])
    assert loaded._active   # hybridized
    inputs = _inputs(len(cfg.class_names))
    for ours, theirs in zip(loaded(*[inputs[n] for n in loaded.infer_input_names]),
                            net(*[inputs[n] for n in net.infer_input_names])):
        np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), rtol=1e-5, atol=1e-6)


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
        make_seeds(results, DataPaths(trained.image_root, trained.annotation_root,
                                      trained.data_list), SeedSettings(crf=False))


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
