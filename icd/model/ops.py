"""Custom operators of the ICD branch: the online sign flip and superpixel pooling.

Both are `mx.operator.CustomOp`s computed with NDArray operators on the context of their inputs
(no host round-trip, no hard-coded device), used from hybridized blocks through `F.Custom`.
Neither passes a gradient (release: AccumResign and SPRefine have none).
"""
from __future__ import annotations

import collections
import threading
from typing import Dict, Optional, Sequence

import mxnet as mx

SIGN_FLIP_MOMENTUM = 0.9  # release: AccumResign momentum
EPS = 1e-5                # release: the max(., 1e-5) guards of AccumResign and SPRefine


# ---------------------------------------------------------------------------------------------
# Sign flip (Sec. 4.2, Eqs. 4-5; release section 3.2)
# ---------------------------------------------------------------------------------------------

class SharedMovingMean:
    """One moving mean shared by all devices, like the release's key-value store.

    With k devices the stored value is updated k times per batch, once per device with that
    device's slice; each device's sign is read right after its own update. Every device pushes
    a value for every class: for a class absent from its slice, its OWN copy of the mean (what
    it pulled last; release section 3.2), so with several devices the store moves 10% toward
    that copy. The master copy lives on the first context; `order` keeps the devices of the last
    k updates and `contributions` their pushed (C, 2) values (icd.distributed exchanges them).

    Order (ours): the release's store takes the updates in whichever order the devices'
    operators run (a race); here in the order in which the devices' forwards are issued
    (`follow`), the training loop's context order: device d's update after device d-1's, one
    of the release's orders, so a seed gives one store on any number of devices.
    """

    def __init__(self, initial: mx.nd.NDArray, contexts: Sequence[mx.Context]):
        self.contexts = list(contexts)
        self.master = initial.copyto(self.contexts[0])
        self.order = collections.deque(maxlen=len(self.contexts))
        self.contributions = collections.deque(maxlen=len(self.contexts))
        self.lock = threading.Lock()
        self.last: Optional[mx.nd.NDArray] = None   # the aux of the forward issued last

    def follow(self, moving_mean: mx.nd.NDArray) -> None:
        """Called as a device's forward is issued, with that device's sign-flip aux state:
        its sign flip will start after that of the forward issued before it has finished.

        An engine dependency, not a wait: a write to this aux that reads the previous device's
        aux is queued between the two forwards, so MXNet runs this device's operator only once
        the previous one has updated the store. No operator ever waits inside MXNet's custom-
        operator threads (a waiting operator could hold the thread the other one needs)."""
        previous, self.last = self.last, moving_mean
        if previous is None or previous.context == moving_mean.context:
            return
        with mx.autograd.pause():
            token = previous.copyto(moving_mean.context)
            moving_mean[:] = mx.nd.where(mx.nd.zeros_like(token), token, moving_mean)

    def update(self, current: mx.nd.NDArray, ctx: mx.Context) -> mx.nd.NDArray:
        """Push the device `ctx`'s value (C, 2) for every class; returns the new store on `ctx`."""
        with self.lock:
            current = current.as_in_context(self.master.context)
            self.master[:] = moving_mean_update(self.master, current)
            self.order.append(self.contexts.index(ctx))
            self.contributions.append(current)
            return self.master.as_in_context(ctx)


# MXNet builds a custom operator from string attributes only, so the sign-flip operators of a
# network's devices cannot be handed a Python object: they find their common store here by the
# key the network passes as an attribute (ICDNet's share key); the training task registers the
# store when it starts (share_moving_mean) and removes it when it stops (unshare_moving_mean).
_SHARED: Dict[str, SharedMovingMean] = {}


def share_moving_mean(key: str, initial: mx.nd.NDArray,
                      contexts: Sequence[mx.Context]) -> SharedMovingMean:
    """Make every sign-flip operator with `key` use one store over `contexts` (multi-device)."""
    _SHARED[key] = SharedMovingMean(initial, contexts)
    return _SHARED[key]


def unshare_moving_mean(key: str) -> None:
    _SHARED.pop(key, None)


def shared_moving_mean(key: str):
    """The store registered for `key`, or None when each device keeps its own value."""
    return _SHARED.get(key)


def issue_in_order(key: str, moving_mean: mx.gluon.Parameter, ctx: mx.Context) -> None:
    """Before a network's forward on `ctx` is issued: with a store registered for `key`, queue
    its sign flip after the one issued before it (`SharedMovingMean.follow`)."""
    store = _SHARED.get(key)
    if store is not None:
        store.follow(moving_mean.data(ctx))


def moving_mean_update(stored, current):
    """stored <- 0.9 stored + 0.1 current for EVERY class (release: push, then the store's
    update); (C, 2) arrays."""
    return SIGN_FLIP_MOMENTUM * stored + (1 - SIGN_FLIP_MOMENTUM) * current


def pushed_value(current, present, own):
    """What a device pushes (release section 3.2): `current` (C, 2) for the classes present in
    its slice (`present` (C,)), its own copy `own` (C, 2) of the mean for the others."""
    return mx.nd.where(mx.nd.broadcast_like(present.reshape((-1, 1)), own), current, own)


def pole_cam_means(s_hat, cam, label):
    """Eq. 4 with the release's guards: mean positive CAM over each pole, averaged over images.

    s_hat, cam: (N, C, h, w); label: (N, C). Returns current (C, 2) = [mean over P, mean over Q]
    and present (C,) = class occurs in the batch (multi-class images included).
    """
    cam_pos = mx.nd.relu(cam)
    poles = []
    for pole in (s_hat > 0, s_hat < 0):
        area = mx.nd.maximum(pole.sum(axis=(2, 3)), EPS)
        poles.append((cam_pos * pole).sum(axis=(2, 3)) / area)            # camP, camQ (N, C)
    count = label.sum(axis=0)
    current = mx.nd.stack(*[(p * label).sum(axis=0) / mx.nd.maximum(count, EPS) for p in poles],
                          axis=1)
    return current, count > 0


class NoGradientOp(mx.operator.CustomOp):
    """A custom operator that passes no gradient to its inputs (release: none of ours does)."""

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        for i, grad in enumerate(in_grad):
            self.assign(grad, req[i], 0)


class SignFlip(NoGradientOp):
    """S = S_hat * sign_c with sign_c = +1 iff stored[c, 0] >= stored[c, 1] (Eq. 5, ties +1).

    In training the moving mean is updated first with this batch (release: the sign rule is
    evaluated after the batch's own update): the device pushes `pushed_value` (its own copy,
    the aux state, for the classes absent from its slice) and its aux takes the result.
    """

    def __init__(self, share_key: str, ctx: mx.Context):
        super().__init__()
        self.share_key = share_key
        self.ctx = ctx   # the operator's device (CPU in_data report cpu(0) whatever the device)

    def forward(self, is_train, req, in_data, out_data, aux):
        s_hat, cam, label = in_data
        stored = aux[0]
        if is_train:
            current = pushed_value(*pole_cam_means(s_hat, cam, label), stored)
            shared = shared_moving_mean(self.share_key)
            if shared is None:
                stored[:] = moving_mean_update(stored, current)
            else:
                stored[:] = shared.update(current, self.ctx)
        sign = (stored[:, 0] >= stored[:, 1]) * 2 - 1
        self.assign(out_data[0], req[0], mx.nd.broadcast_mul(s_hat, sign.reshape((1, -1, 1, 1))))


@mx.operator.register("icd_sign_flip")
class SignFlipProp(mx.operator.CustomOpProp):
    def __init__(self, share_key: str = ""):
        super().__init__(need_top_grad=False)
        self.share_key = share_key

    def list_arguments(self):
        return ["s_hat", "cam", "label"]

    def list_auxiliary_states(self):
        return ["moving_mean"]

    def infer_shape(self, in_shape):
        s_hat, cam, label = in_shape
        return [s_hat, cam, label], [s_hat], [(s_hat[1], 2)]

    def create_operator(self, ctx, shapes, dtypes):
        return SignFlip(self.share_key, ctx)


# ---------------------------------------------------------------------------------------------
# Superpixel pooling (Sec. 4.3; release section 3.3)
# ---------------------------------------------------------------------------------------------

def sampling_stride(size: int, target: int) -> Optional[int]:
    """s when a bilinear resize with aligned corners from `size` to `target` samples exactly
    every s-th input (output i reads input i (size - 1) / (target - 1), an integer: 321 -> 41
    and 513 -> 65 give 8); None otherwise."""
    if size == target:
        return 1
    if target > 1 and (size - 1) % (target - 1) == 0:
        return (size - 1) // (target - 1)
    return None


def superpixel_memberships(superpixel, num_ids: int, like):
    """Soft memberships A (N, K, h*w): one-hot ids resized to the score map (bilinear, corners).

    superpixel (N, H, W) ids; like (N, C, h, w). Where the resize only samples every s-th pixel
    (`sampling_stride`) the one-hot of those pixels is the same A without the full-resolution
    one-hot (N, K, H, W) (16 x 65 x 321^2 floats, 428 MB, at the release's batch).
    """
    (height, width), (h, w) = superpixel.shape[1:], like.shape[2:]
    sy, sx = sampling_stride(height, h), sampling_stride(width, w)
    if sy is not None and sx is not None:
        sampled = mx.nd.slice(superpixel, begin=(None, 0, 0), end=(None, None, None),
                              step=(1, sy, sx))                                    # (N, h, w)
        return mx.nd.one_hot(sampled.reshape((0, -1)), num_ids).transpose((0, 2, 1))
    one_hot = mx.nd.one_hot(superpixel, num_ids).transpose((0, 3, 1, 2))          # (N, K, H, W)
    one_hot = mx.nd.contrib.BilinearResize2D(one_hot, like=like, mode="like", align_corners=True)
    return one_hot.reshape((0, 0, -1))


def superpixel_pool(score, superpixel, label, num_ids: int):
    """S' from S: foreground or background mean of each superpixel, scattered back.

    score: (N, C, h, w) sign-flipped S; superpixel: (N, H, W) ids < num_ids; label: (N, C).
    A superpixel is foreground for the one class (argmax of its mean class-normalised positive
    score) if some class has a positive signed mass > 1e-5 in it and that class is present;
    its value is then the mean of max(X, 0), otherwise the mean of min(X, 0).
    Ids that do not occur have zero membership and contribute nothing, so a fixed `num_ids`
    gives the release's result (which uses max id + 1).
    """
    n, c, h, w = score.shape
    A = superpixel_memberships(superpixel, num_ids, score)                         # (N, K, hw)
    X = mx.nd.broadcast_mul(score, label.reshape((n, c, 1, 1))).reshape((n, c, -1))
    area = mx.nd.maximum(A.sum(axis=2), EPS).reshape((n, 1, -1))                   # (N, 1, K)

    def weighted_mean(values):                                                     # (N, C, K)
        return mx.nd.broadcast_div(mx.nd.batch_dot(values, A, transpose_b=True), area)

    capable = mx.nd.batch_dot(mx.nd.sign(X), A, transpose_b=True).max(axis=1) > EPS  # (N, K)
    X_pos = mx.nd.relu(X)
    class_norm = mx.nd.broadcast_div(X_pos, mx.nd.maximum(X.max(axis=1, keepdims=True), EPS))
    winner = mx.nd.argmax(weighted_mean(class_norm), axis=1)                       # (N, K)
    is_winner = mx.nd.one_hot(winner, c).transpose((0, 2, 1))                      # (N, C, K)
    fg = is_winner * capable.expand_dims(1) * label.expand_dims(2)
    value = fg * weighted_mean(X_pos) + (1 - fg) * weighted_mean(mx.nd.minimum(X, 0))
    return mx.nd.batch_dot(value, A).reshape((n, c, h, w))


class SuperpixelPool(NoGradientOp):
    def __init__(self, num_ids: int):
        super().__init__()
        self.num_ids = num_ids

    def forward(self, is_train, req, in_data, out_data, aux):
        score, superpixel, label = in_data
        self.assign(out_data[0], req[0], superpixel_pool(score, superpixel, label, self.num_ids))


@mx.operator.register("icd_superpixel_pool")
class SuperpixelPoolProp(mx.operator.CustomOpProp):
    def __init__(self, num_ids: str = "65"):
        super().__init__(need_top_grad=False)
        self.num_ids = int(num_ids)

    def list_arguments(self):
        return ["score", "superpixel", "label"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return SuperpixelPool(self.num_ids)

