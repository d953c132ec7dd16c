"""The release's custom operators (docs/release.md section 3), written as numpy
``mx.operator.CustomOp``.

Every operator is registered under an ``op_type`` prefixed ``ref_`` so it never clashes with the
Gluon model's operators:

==========================  ==============================  ==========================================
op_type                     release name                    spec
==========================  ==============================  ==========================================
``ref_icd_bottom_up``       ``ICD_BottomUp``                3.1 (gradient only into icd_bu_weight)
``ref_icd_accum_resign``    ``AccumResign``                 3.2 (moving-mean sign flip, aux state)
``ref_icd_sp_refine``       ``SPRefine``                    3.3 (no gradient)
``ref_icd_top_down``        ``ICD_TopDown``                 3.4 (masked sigmoid loss with warm-up)
``ref_multi_sigmoid_loss``  ``MultiSigmoidLoss``            3.5
==========================  ==============================  ==========================================

Shapes: N images, C classes, C5 backbone channels, (h, w) feature map, (H, W) input image.
"""
import threading

import mxnet as mx
import numpy as np

__all__ = [
    "ICDBottomUp", "AccumResign", "SPRefine", "ICDTopDown", "MultiSigmoidLoss",
    "bottom_up_weight_grad", "accum_resign_update", "resign_sign", "superpixel_membership", "sp_refine",
    "top_down_grad",
    "top_down_warm", "reset_shared_store", "shared_moving_mean",
]


# ----------------------------------------------------------------------------------------------
# numpy kernels (shared by the operators and by the tests' hand checks)
# ----------------------------------------------------------------------------------------------

def bottom_up_weight_grad(s_hat, feat, label, weight, grad_scale=10.0):
    """Gradient of L_bu w.r.t. the raw ``icd_bu_weight`` (section 3.1).

    s_hat (N,C,h,w) pre-flip projections, feat (N,C5,h,w) BN features, label (N,C) multi-hot,
    weight (C,C5) raw weight. Returns (C,C5).
    """
    n, c, h, w = s_hat.shape
    # 3.1: multi-class rows (label sum >= 1.001) are zeroed
    single = label * (label.sum(axis=1, keepdims=True) < 1.001)
    # 3.1: D = S_hat * mask, flattened over (N,h,w)
    d = (s_hat * single[:, :, None, None]).transpose(1, 0, 2, 3).reshape(c, -1)
    f = feat.transpose(1, 0, 2, 3).reshape(feat.shape[1], -1)
    # 3.1: g = -(10/(h*w)) D F^T, summed over the batch, no 1/N, no factor 2
    g = -(grad_scale / (h * w)) * d.dot(f.T)
    # 3.1: through the row-wise L2 normalisation, r = ||w|| per row
    r = np.sqrt((weight * weight).sum(axis=1, keepdims=True))
    wg = (weight * g).sum(axis=1, keepdims=True)
    return -weight * wg / (r ** 3 + 1e-5) + g / (r + 1e-5)


def accum_resign_update(stored, s_hat, x_cam, label, momentum=0.9, own=None):
    """One moving-mean update of ``AccumResign`` (section 3.2); returns the new (C,2) store.

    stored (C,2) [meanP, meanQ] the shared store, s_hat (N,C,h,w), x_cam (N,C,h,w), label (N,C),
    own (C,2) the device's own aux copy (what it pulled last; default ``stored``, one device).
    """
    pos = (s_hat > 0).astype(np.float64)
    neg = (s_hat < 0).astype(np.float64)
    cam = np.maximum(x_cam, 0)  # 3.2: cam+ = max(x_cam, 0)
    cam_p = (cam * pos).sum(axis=(2, 3)) / np.maximum(pos.sum(axis=(2, 3)), 1e-5)
    cam_q = (cam * neg).sum(axis=(2, 3)) / np.maximum(neg.sum(axis=(2, 3)), 1e-5)
    # 3.2: per class over the batch with all labels (multi-class images included)
    cnt = label.sum(axis=0)
    mean_p = (cam_p * label).sum(axis=0) / np.maximum(cnt, 1e-5)
    mean_q = (cam_q * label).sum(axis=0) / np.maximum(cnt, 1e-5)
    current = np.stack([mean_p, mean_q], axis=1)
    # 3.2: a class absent from the device's slice pushes the device's OWN copy (its last pull),
    # and the store moves 10% toward the pushed value for EVERY class
    current = np.where((cnt > 0)[:, None], current, stored if own is None else own)
    return momentum * stored + (1 - momentum) * current


def resign_sign(stored):
    """Section 3.2: sign_c = +1 if stored[c,0] >= stored[c,1] else -1 (ties give +1); (C,2) -> (C,)."""
    return np.where(stored[:, 0] >= stored[:, 1], 1.0, -1.0)


def superpixel_membership(superpixel, h, w):
    """Soft memberships A (N,K,h*w) of section 3.3 from (N,H,W) float ids; K = max id + 1."""
    ids = superpixel.astype(np.int64)
    k = int(ids.max()) + 1  # 3.3: K = max superpixel id in the batch + 1
    onehot = (ids[:, None, :, :] == np.arange(k)[None, :, None, None]).astype(np.float32)
    if onehot.shape[2:] != (h, w):
        # 3.3: resize with MXNet contrib.BilinearResize2D, align_corners true
        onehot = mx.nd.contrib.BilinearResize2D(
            mx.nd.array(onehot, dtype=np.float32), height=h, width=w, align_corners=True).asnumpy()
    return onehot.reshape(onehot.shape[0], k, h * w)


def sp_refine(s, superpixel, label):
    """Superpixel refinement S' of section 3.3.

    s (N,C,h,w) flipped bottom-up scores, superpixel (N,H,W) float ids, label (N,C).
    Returns S' (N,C,h,w).
    """
    n, c, h, w = s.shape
    a = superpixel_membership(superpixel, h, w).astype(np.float64)  # (N,K,hw)
    x = s.reshape(n, c, h * w).astype(np.float64) * label[:, :, None]  # 3.3: X = S*y
    mass = np.maximum(a.sum(axis=2), 1e-5)  # (N,K): max(sum A, 1e-5)
    # 3.3: foreground-capable if for some class sum_pixels sign(X)*A > 1e-5
    capable = (np.einsum("ncp,nkp->nck", np.sign(x), a) > 1e-5).any(axis=1)  # (N,K)
    # 3.3: class = argmax_c of the A-weighted mean of max(X,0)/max(max_c X, 1e-5)
    x_pos = np.maximum(x, 0)
    x_neg = np.minimum(x, 0)
    norm = x_pos / np.maximum(x.max(axis=1, keepdims=True), 1e-5)
    cls = (np.einsum("ncp,nkp->nck", norm, a) / mass[:, None, :]).argmax(axis=1)  # (N,K)
    # 3.3: fg[c,k] = capable * (c is that class) * y_c
    fg = capable[:, None, :] * (cls[:, None, :] == np.arange(c)[None, :, None]) * (label[:, :, None] > 0)
    # 3.3: value = weighted mean of max(X,0) if fg else of min(X,0)
    mean_pos = np.einsum("ncp,nkp->nck", x_pos, a) / mass[:, None, :]
    mean_neg = np.einsum("ncp,nkp->nck", x_neg, a) / mass[:, None, :]
    value = np.where(fg, mean_pos, mean_neg)  # (N,C,K)
    # 3.3: scatter back S'[c,p] = sum_k value[c,k] A[k,p]
    return np.einsum("nck,nkp->ncp", value, a).reshape(n, c, h, w)


def top_down_warm(t, warmup_iters):
    """Warm-up factor of section 3.4 for counter value t: exp(-10 t/W) while t > 0, else 1."""
    if warmup_iters > 0 and t > 0:
        return float(np.exp(-10.0 * t / warmup_iters))
    return 1.0


def top_down_grad(logits, refined, label, warm):
    """Gradient of L_td w.r.t. conv_ft's output S'' (section 3.4), grad_scale 1.

    logits (N,C,h,w) S'', refined (N,C,h,w) S', label (N,C), warm scalar. Returns (N,C,h,w).
    """
    h, w = logits.shape[2:]
    r_max = refined.max(axis=(2, 3), keepdims=True)
    r_min = refined.min(axis=(2, 3), keepdims=True)
    # 3.4: Z = max(S',0)/max(max S', 1e-5) + min(S',0)/(-min(min S', -1e-5))
    z = np.maximum(refined, 0) / np.maximum(r_max, 1e-5) + np.minimum(refined, 0) / -np.minimum(r_min, -1e-5)
    mask = np.abs(z) > 0.2
    target = z > 0
    prob = 1.0 / (1.0 + np.exp(-logits))
    return (prob - target) * label[:, :, None, None] * mask * warm / (h * w)


# ----------------------------------------------------------------------------------------------
# AccumResign's shared store (section 3.2)
# ----------------------------------------------------------------------------------------------

# In the release the moving mean lives in one key-value store shared by every device: with k
# devices it is updated k times per batch, once per device with that device's slice, in the order
# in which the devices' forward calls reach the operator. Each device pushes its update, pulls the
# store into its own aux array and takes the sign from it, so after a batch device d's aux holds
# the value it pulled right after its own push (earlier devices of the batch an older value), and
# a checkpoint (Module.save_params) holds the average of the devices' aux arrays, not the store
# (docs/release.md section 11). For a class absent from its slice a device pushes its own aux
# copy, so with several devices the store moves 10% toward that stale copy (section 3.2). Here
# the store is this module-level dict, keyed by the operator's ``store_key``. The release creates it with zeros; here its entry is created from the
# aux state of the first device that runs a training forward after ``reset_shared_store``, so that
# a parity bundle can start the store from its params.params (on one device store and aux agree).
# Read the store with shared_moving_mean().
_SHARED_STORE = {}
_SHARED_LOCK = threading.Lock()


def reset_shared_store(key=None):
    """Forget the stored moving mean of ``key`` (all keys if None); the next training forward
    re-initialises it from that device's aux state."""
    with _SHARED_LOCK:
        if key is None:
            _SHARED_STORE.clear()
        else:
            _SHARED_STORE.pop(key, None)


def shared_moving_mean(key="icd_accum_resign"):
    """The shared (C,2) moving mean of ``key`` as numpy (None before the first training forward)."""
    with _SHARED_LOCK:
        value = _SHARED_STORE.get(key)
        return None if value is None else value.copy()


# ----------------------------------------------------------------------------------------------
# operators
# ----------------------------------------------------------------------------------------------

def _zero_grads(op, req, in_grad):
    for i, g in enumerate(in_grad):
        op.assign(g, req[i], 0)


class ICDBottomUp(mx.operator.CustomOp):
    """``ICD_BottomUp`` (3.1). Inputs: s_hat (N,C,h,w) from the 1x1 conv of the BlockGrad-ed BN
    features with the L2Normalization-ed, BlockGrad-ed weight; feat (N,C5,h,w) BlockGrad-ed BN
    features; label (N,C); weight (C,C5) the raw icd_bu_weight. Output: s_hat unchanged.
    Backward: the 3.1 gradient into ``weight`` only, zero elsewhere (out_grad is ignored)."""

    def __init__(self, grad_scale):
        super().__init__()
        self.grad_scale = grad_scale

    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        s_hat, feat, label, weight = (x.asnumpy().astype(np.float64) for x in in_data)
        grad_w = bottom_up_weight_grad(s_hat, feat, label, weight, self.grad_scale)
        for i in range(3):
            self.assign(in_grad[i], req[i], 0)
        self.assign(in_grad[3], req[3], mx.nd.array(grad_w, dtype=in_grad[3].dtype))


@mx.operator.register("ref_icd_bottom_up")
class ICDBottomUpProp(mx.operator.CustomOpProp):
    def __init__(self, grad_scale="10"):
        super().__init__(need_top_grad=False)
        self.grad_scale = float(grad_scale)

    def list_arguments(self):
        return ["s_hat", "feat", "label", "weight"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        s_hat, feat = in_shape[0], in_shape[1]
        return [s_hat, feat, [s_hat[0], s_hat[1]], [s_hat[1], feat[1]]], [s_hat], []

    def create_operator(self, ctx, shapes, dtypes):
        return ICDBottomUp(self.grad_scale)


class AccumResign(mx.operator.CustomOp):
    """``AccumResign`` (3.2). Inputs: s_hat (N,C,h,w), x_cam (N,C,h,w), label (N,C); aux
    moving_mean (C,2). Output S = s_hat * sign_c. Training forward first updates the shared store
    with this device's slice (momentum 0.9), then takes the sign from the updated value; inference
    reads the sign from the aux state and does not update. No gradient."""

    def __init__(self, store_key, momentum):
        super().__init__()
        self.store_key = store_key
        self.momentum = momentum

    def forward(self, is_train, req, in_data, out_data, aux):
        s_hat = in_data[0].asnumpy()
        if is_train:
            x_cam, label = in_data[1].asnumpy(), in_data[2].asnumpy()
            with _SHARED_LOCK:  # 3.2: one store shared by all devices, updated once per device
                stored = _SHARED_STORE.get(self.store_key)
                if stored is None:
                    stored = aux[0].asnumpy()
                # the store holds float32 like the aux state / checkpoint it stands for
                stored = accum_resign_update(stored, s_hat, x_cam, label, self.momentum,
                                             own=aux[0].asnumpy()).astype(np.float32)
                _SHARED_STORE[self.store_key] = stored
            aux[0][:] = stored  # release: each device's aux is overwritten by its pull
        else:
            stored = aux[0].asnumpy()
        sign = resign_sign(stored)  # 3.2: evaluated after the batch's own update
        self.assign(out_data[0], req[0], mx.nd.array(s_hat * sign[None, :, None, None].astype(np.float32)))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        _zero_grads(self, req, in_grad)


@mx.operator.register("ref_icd_accum_resign")
class AccumResignProp(mx.operator.CustomOpProp):
    def __init__(self, store_key="icd_accum_resign", momentum="0.9"):
        super().__init__(need_top_grad=False)
        self.store_key = store_key
        self.momentum = float(momentum)

    def list_arguments(self):
        return ["s_hat", "x_cam", "label"]

    def list_auxiliary_states(self):
        return ["moving_mean"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        s_hat = in_shape[0]
        return [s_hat, s_hat, [s_hat[0], s_hat[1]]], [s_hat], [[s_hat[1], 2]]

    def create_operator(self, ctx, shapes, dtypes):
        return AccumResign(self.store_key, self.momentum)


class SPRefine(mx.operator.CustomOp):
    """``SPRefine`` (3.3). Inputs: s (N,C,h,w) flipped scores, superpixel (N,H,W), label (N,C).
    Output S' (N,C,h,w). No gradient."""

    def forward(self, is_train, req, in_data, out_data, aux):
        s, superpixel, label = (x.asnumpy() for x in in_data)
        refined = sp_refine(s, superpixel, label)
        self.assign(out_data[0], req[0], mx.nd.array(refined, dtype=np.float32))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        _zero_grads(self, req, in_grad)


@mx.operator.register("ref_icd_sp_refine")
class SPRefineProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=False)

    def list_arguments(self):
        return ["s", "superpixel", "label"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return SPRefine()


class ICDTopDown(mx.operator.CustomOp):
    """``ICD_TopDown`` (3.4). Inputs: logits (N,C,h,w) = conv_ft output S'', refined (N,C,h,w) S',
    label (N,C). Output sigmoid(S''). Backward into ``logits`` only. The warm-up counter t belongs
    to this operator instance (one per device executor), starts at warmup_iters and is read, then
    decremented, by every backward call."""

    def __init__(self, warmup_iters, grad_scale):
        super().__init__()
        self.warmup_iters = warmup_iters
        self.grad_scale = grad_scale
        self.counter = warmup_iters

    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], mx.nd.sigmoid(in_data[0]))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        warm = top_down_warm(self.counter, self.warmup_iters)  # 3.4: read ...
        self.counter = max(self.counter - 1, 0)  # ... then decrement
        logits, refined, label = (x.asnumpy().astype(np.float64) for x in in_data)
        grad = self.grad_scale * top_down_grad(logits, refined, label, warm)
        self.assign(in_grad[0], req[0], mx.nd.array(grad, dtype=in_grad[0].dtype))
        self.assign(in_grad[1], req[1], 0)
        self.assign(in_grad[2], req[2], 0)


@mx.operator.register("ref_icd_top_down")
class ICDTopDownProp(mx.operator.CustomOpProp):
    def __init__(self, warmup_iters="0", grad_scale="1"):
        super().__init__(need_top_grad=False)
        self.warmup_iters = int(warmup_iters)
        self.grad_scale = float(grad_scale)

    def list_arguments(self):
        return ["logits", "refined", "label"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        logits = in_shape[0]
        return [logits, logits, [logits[0], logits[1]]], [logits], []

    def create_operator(self, ctx, shapes, dtypes):
        return ICDTopDown(self.warmup_iters, self.grad_scale)


class MultiSigmoidLoss(mx.operator.CustomOp):
    """``MultiSigmoidLoss`` (3.5). Inputs: logits (N,C) pooled x_cam, label (N,C). Output
    sigmoid(logits); gradient p - y into logits."""

    def forward(self, is_train, req, in_data, out_data, aux):
        self.assign(out_data[0], req[0], mx.nd.sigmoid(in_data[0]))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        self.assign(in_grad[0], req[0], out_data[0] - in_data[1])
        self.assign(in_grad[1], req[1], 0)


@mx.operator.register("ref_multi_sigmoid_loss")
class MultiSigmoidLossProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=False)

    def list_arguments(self):
        return ["logits", "label"]

    def list_outputs(self):
        return ["output"]

    def infer_shape(self, in_shape):
        return [in_shape[0], in_shape[0]], [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return MultiSigmoidLoss()
