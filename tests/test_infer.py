"""Inference of the ICD networks (icd.infer): the network loaded once for every inference
command (`inference_network`), and a forward without the training schedule's `warm`."""
import mxnet as mx
import numpy as np
import pytest

from icd import infer
from icd.checkpoint import save_checkpoint
from icd.config import load_config
from icd.model import build_model, model_from_config

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
    _, outputs = infer._queue(icd_net, batch, [mx.cpu()])
    assert list(outputs[0]) == list(SCORES)
    assert all(o.dtype == np.float32 for o in outputs[0].values())


def test_inference_network_loads_the_checkpoint(tmp_path):
    """`inference_network`: the config's network, the checkpoint's values, hybridized."""
    cfg = load_config(None, model="vgg16_icd", width=0.0625)
    net = model_from_config(cfg)
    net.initialize(mx.init.Normal(0.05))
    params = str(tmp_path / "vgg16_icd-0000.params")
    save_checkpoint(net, params)
    loaded = infer.inference_network(cfg, params, [mx.cpu()])
    assert loaded._active   # hybridized
    inputs = _inputs(len(cfg.class_names))
    for ours, theirs in zip(loaded(*[inputs[n] for n in loaded.infer_input_names]),
                            net(*[inputs[n] for n in net.infer_input_names])):
        np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), rtol=1e-5, atol=1e-6)
