"""A training step's memory per device, estimated before the first step (icd.memory): the
warning that names --batch-size, asked of GPU contexts only."""
import logging

import mxnet as mx
import pytest

from icd import memory
from icd.config import Config
from icd.engine import loop as train_module
from icd.tasks import train

FIGURES = {"vgg16_icd": {"fixed_mb": 1000.0, "per_image_mb": 500.0}}


@pytest.fixture
def gpus_with_4_gib_free(monkeypatch):
    """Every GPU has 4 GiB free of 12; the device ids asked."""
    asked = []

    def info(device_id):
        asked.append(device_id)
        return 4 * 2 ** 30, 12 * 2 ** 30
    monkeypatch.setattr(memory, "MEASURED", FIGURES)
    monkeypatch.setattr(mx.context, "gpu_memory_info", info)
    return asked


def test_a_step_beyond_a_gpus_free_memory_is_named_with_the_batch_size(gpus_with_4_gib_free,
                                                                        caplog):
    cfg = Config(model="vgg16_icd", batch_size=32, image_size=321)
    with caplog.at_level(logging.WARNING, logger="icd.memory"):
        estimate = memory.warn_if_short(cfg, [mx.gpu(0), mx.gpu(1)])
    assert estimate == 1000 + 500 * 16 and gpus_with_4_gib_free == [0, 1]
    assert "about 9000 MiB per device for 16 images of 321 px (--batch-size 32 over 2 devices)" \
        in caplog.text and "4096 MiB free on gpu(0)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icd.memory"):   # 1000 + 500 x 3 fits
        assert memory.warn_if_short(Config(model="vgg16_icd", batch_size=6, image_size=321),
                                    [mx.gpu(0), mx.gpu(1)]) == 2500
        # a smaller crop scales with its area
        assert memory.warn_if_short(Config(model="vgg16_icd", batch_size=32, image_size=107),
                                    [mx.gpu(0), mx.gpu(1)]) == pytest.approx(1000 + 16 * 500 / 9)
    assert "MiB" not in caplog.text


def test_cpu_contexts_and_unmeasured_models_ask_no_gpu(gpus_with_4_gib_free, caplog):
    with caplog.at_level(logging.WARNING, logger="icd.memory"):
        assert memory.warn_if_short(Config(model="vgg16_icd", batch_size=32, image_size=321),
                                    [mx.cpu(1), mx.cpu(2)]) == 9000
        assert memory.warn_if_short(Config(model="vgg16_cam", batch_size=32), [mx.gpu(0)]) \
            is None
        assert memory.warn_if_short(Config(model="vgg16_icd", width=0.5), [mx.gpu(0)]) is None
    assert gpus_with_4_gib_free == [] and not caplog.text


def test_training_estimates_its_memory_before_its_first_step(tiny_config, monkeypatch):
    events = []
    warn, step = memory.warn_if_short, train_module._step
    monkeypatch.setattr(memory, "warn_if_short",
                        lambda cfg, contexts: events.append(("memory", cfg.batch_size,
                                                             contexts)) or warn(cfg, contexts))
    monkeypatch.setattr(train_module, "_step",
                        lambda loop, batch: events.append(("step",)) or step(loop, batch))
    train(tiny_config(num_epoch=1, cpus=2))
    assert events[0] == ("memory", 4, [mx.cpu(0), mx.cpu(1)]) and events[1] == ("step",)


def test_every_full_width_shipped_config_has_an_estimate():
    from icd.bench import shipped_configs
    for name, cfg in shipped_configs().items():
        estimate = memory.estimate_mb(cfg["model"], cfg["image_size"], cfg["batch_size"],
                                      cfg["width"])
        assert (estimate is not None) == (cfg["width"] == 1.0), name
