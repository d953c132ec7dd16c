"""Superpixel pooling without the full-resolution one-hot where the resize only samples pixels:
the same memberships A and the same S' as the resized one-hot, exactly."""
import contextlib

import mxnet as mx
import numpy as np
import pytest

from icd.model import ops
from icd.model.ops import sampling_stride, superpixel_memberships, superpixel_pool


@contextlib.contextmanager
def one_hot_inputs(monkeypatch):
    """The shapes of every input mx.nd.one_hot receives meanwhile; a resize fails."""
    seen, one_hot = [], mx.nd.one_hot

    def recorded(indices, *args, **kwargs):
        seen.append(tuple(indices.shape))
        return one_hot(indices, *args, **kwargs)

    def no_resize(*args, **kwargs):
        raise AssertionError("the memberships were resized from the full resolution")

    with monkeypatch.context() as patch:
        patch.setattr(mx.nd, "one_hot", recorded)
        patch.setattr(mx.nd.contrib, "BilinearResize2D", no_resize)
        yield seen


def resized_memberships(superpixel, num_ids, like):
    """The release's A (section 3.3): the full one-hot resized with aligned corners."""
    one_hot = mx.nd.one_hot(superpixel, num_ids).transpose((0, 3, 1, 2))
    return mx.nd.contrib.BilinearResize2D(one_hot, like=like, mode="like",
                                          align_corners=True).reshape((0, 0, -1))


@pytest.mark.parametrize("size, feature", [(321, 41), (513, 65)])
def test_sampled_one_hot_equals_the_resized_one_hot(size, feature, monkeypatch):
    rng = np.random.RandomState(size)
    num_ids, num_cls = 65, 4
    # blocky superpixels of every id, and isolated single pixels of other ids
    blocks = rng.randint(0, num_ids, (2, size // 16 + 1, size // 16 + 1))
    ids = np.kron(blocks, np.ones((16, 16)))[:, :size, :size]
    ids[rng.rand(*ids.shape) < 0.01] = rng.randint(0, num_ids)
    superpixel = mx.nd.array(ids)
    score = mx.nd.array(rng.randn(2, num_cls, feature, feature))
    label = mx.nd.array([[1, 0, 1, 0], [0, 1, 0, 0]])
    assert sampling_stride(size, feature) == 8
    expected = resized_memberships(superpixel, num_ids, score).asnumpy()
    with one_hot_inputs(monkeypatch) as seen:
        ours = superpixel_memberships(superpixel, num_ids, score)
        pooled = superpixel_pool(score, superpixel, label, num_ids).asnumpy()
    # the one-hot only ever sees the sampled ids (N, h*w) (and pooling's (N, K) winners)
    assert seen and all(np.prod(shape[1:]) <= feature * feature for shape in seen), seen
    assert ours.shape == (2, num_ids, feature * feature)
    np.testing.assert_array_equal(ours.asnumpy(), expected)
    monkeypatch.setattr(ops, "superpixel_memberships", resized_memberships)
    np.testing.assert_array_equal(pooled,
                                  superpixel_pool(score, superpixel, label, num_ids).asnumpy())


def test_other_sizes_keep_the_resize():
    """Where the resize interpolates (96 -> 12: 95 is not a multiple of 11) A is the resized
    one-hot, fractional memberships included; the same size needs no resize."""
    assert sampling_stride(96, 12) is None and sampling_stride(40, 1) is None
    assert sampling_stride(64, 64) == 1
    rng = np.random.RandomState(0)
    superpixel = mx.nd.array(rng.randint(0, 10, (1, 96, 96)))
    like = mx.nd.zeros((1, 3, 12, 12))
    ours = superpixel_memberships(superpixel, 10, like).asnumpy()
    np.testing.assert_array_equal(ours, resized_memberships(superpixel, 10, like).asnumpy())
    assert ((ours > 0) & (ours < 1)).any()
