"""Losses of the ICD framework as Gluon-symbolic functions with the release's exact gradients.

Each function returns a scalar whose gradient equals what the release's loss operator writes
(docs/release.md section 3): the release's operators produce gradients, not loss values, so
where the two differ we build a surrogate `sum(BlockGrad(grad) * x)` whose derivative is `grad`.
All gradients are sums over the batch; the trainer's rescale 1/batch_size does the rest (sec. 4).
"""
from __future__ import annotations

import math

from ..constants import BOTTOM_UP_VARIANTS, IGNORE_LABEL

BOTTOM_UP_SCALE = 10.0    # release: ICD_BottomUp grad_scale
SINGLE_CLASS_MAX = 1.001  # release: rows whose label sum >= 1.001 are multi-class
NORM_EPS = 1e-5           # release: epsilons of the L2-normalisation backward
TOP_DOWN_MARGIN = 0.2     # release: pixels with |normalised S'| <= 0.2 are ignored
OUTPUT_STRIDE = 8         # the DeepLab networks' score maps: input side H -> ceil(H / 8)


def sigmoid_cross_entropy(F, logits, target):
    """Element-wise binary cross-entropy on logits; its gradient is sigmoid(logits) - target."""
    return F.relu(logits) - logits * target + F.log(1 + F.exp(-F.abs(logits)))


def multi_sigmoid_loss(F, pooled_logits, label):
    """L_cam: MultiSigmoidLoss on the GAP of the CAM logits, (N, C); gradient p - y."""
    return F.sum(sigmoid_cross_entropy(F, pooled_logits, label))


def pixel_count(F, score):
    """h*w of a (N, C, h, w) map as a (N, 1, 1, 1) array (shape-agnostic for hybridization)."""
    one_map = F.ones_like(F.slice_axis(score, axis=1, begin=0, end=1))
    return F.sum(one_map, axis=(1, 2, 3), keepdims=True)


def bottom_up_loss(F, weight, feature, s_hat, label, variant: str = "bu"):
    """L_bu (Eq. 1) or its variants L_abs (Eq. 8) / L_sig (Eqs. 9-10), gradient to `weight` only.

    weight: raw directional vectors w_hat (C, D); feature: BN features f (N, D, h, w), detached;
    s_hat: pre-flip projections w.f (N, C, h, w), detached; label: (N, C).
    Unified form of Eq. 11: g = -(10 / (h w)) sum_{n,k} phi(s) f over single-class images, with
    phi = s (L_bu; release: no factor 2), sign(s) (L_abs) or Y - sigmoid(s) (L_sig). Then through
    w = w_hat / r (Eq. 2) with the release's epsilons:
    grad = -w_hat (w_hat . g) / (r^3 + 1e-5) + g / (r + 1e-5).
    """
    if variant == "bu":
        phi = s_hat
    elif variant == "abs":
        phi = F.sign(s_hat)
    elif variant == "sig":
        phi = (s_hat > 0) - F.sigmoid(s_hat)
    else:
        raise ValueError(f"unknown bottom-up loss {variant!r}; choose one of {BOTTOM_UP_VARIANTS}")
    # release: L_bu uses single-class images only
    single = F.broadcast_mul(label, F.sum(label, axis=1, keepdims=True) < SINGLE_CLASS_MAX)
    phi = F.broadcast_div(F.broadcast_mul(phi, single.expand_dims(2).expand_dims(3)),
                          pixel_count(F, s_hat))
    g = F.sum(F.batch_dot(phi.reshape((0, 0, -1)), feature.reshape((0, 0, -1)), transpose_b=True),
              axis=0) * -BOTTOM_UP_SCALE                                          # (C, D)
    r = F.sqrt(F.sum(F.square(weight), axis=1, keepdims=True))                    # (C, 1)
    grad = F.broadcast_add(
        F.broadcast_div(-F.broadcast_mul(weight, F.sum(weight * g, axis=1, keepdims=True)),
                        r ** 3 + NORM_EPS),
        F.broadcast_div(g, r + NORM_EPS))
    return F.sum(F.BlockGrad(grad) * weight)


def top_down_loss(F, logits, refined, label, warm):
    """L_td (Eq. 7) with the release's mask and warm-up; gradient into `logits` (S'') only.

    logits: S'' (N, C, h, w); refined: S' (N, C, h, w); label: (N, C), all images; warm: (1,).
    Z = max(S', 0) / max(max S', 1e-5) + min(S', 0) / -min(min S', -1e-5) per (n, c);
    B = Z > 0 (Eq. 6); grad = (sigmoid(S'') - B) * y * [|Z| > 0.2] * warm / (h w).
    """
    top = F.maximum(F.max(refined, axis=(2, 3), keepdims=True), NORM_EPS)
    bottom = -F.minimum(F.min(refined, axis=(2, 3), keepdims=True), -NORM_EPS)
    z = F.broadcast_div(F.relu(refined), top) + F.broadcast_div(F.minimum(refined, 0), bottom)
    target = z > 0
    weight = F.broadcast_mul(F.abs(z) > TOP_DOWN_MARGIN, label.expand_dims(2).expand_dims(3))
    weight = F.broadcast_div(F.broadcast_mul(weight, warm.reshape((1, 1, 1, 1))),
                             pixel_count(F, logits))
    return F.sum(F.BlockGrad(weight) * sigmoid_cross_entropy(F, logits, F.BlockGrad(target)))


def top_down_warmup(iteration: int, warmup_iters: int) -> float:
    """Weight of L_td at 0-based training iteration `iteration` (release section 3.4).

    The release's counter t starts at W = warmup_iters and is read then decremented at each
    step: warm = exp(-10 t / W) while t > 0, then 1. So step 0 uses e^-10 and step W-1 e^(-10/W).
    """
    remaining = warmup_iters - iteration
    return math.exp(-10.0 * remaining / warmup_iters) if remaining > 0 else 1.0


def nearest_label(F, label, logits, stride: int = OUTPUT_STRIDE):
    """Labels shrunk to the score map (DeepLab-LargeFOV's label_shrink): each cell of the score
    map takes the label of the input pixel at its centre.

    label: (N, H, W) class ids at the input resolution; logits: (N, K, h, w) with
    h = ceil(H / stride). Output row i samples input row min(stride i, H - 1) (columns alike):
    the centre of cell i's receptive field in every network here (each stride-2 layer, with
    the padding of section 2, maps output cell i to input cell 2i). For crops of side
    stride k + 1 (321 -> 41, 513 -> 65) that is DeepLab's corner-aligned shrink; for other
    sides (96 -> 12) the corner-aligned rule round(i (H - 1) / (h - 1)) drifts off the centres
    by up to stride - 1 pixels at the far border, so the loss would teach the network labels
    of pixels it does not look at (measured: 2.4% of the cells of a 96 px crop of the
    synthetic masks). Returns (N, h, w) float32 ids.
    """
    picked = label
    for label_axis, score_axis in ((1, 2), (2, 3)):
        last = F.max(F.contrib.arange_like(label, axis=label_axis))        # H - 1
        index = F.broadcast_minimum(F.contrib.arange_like(logits, axis=score_axis) * stride,
                                    last)
        picked = F.take(picked, index, axis=label_axis)
    return picked


def segmentation_loss(F, logits, label):
    """Softmax cross-entropy of DeepLab with 255 ignored, summed over the batch.

    logits: (N, K, h, w) with K = C + 1 classes; label: (N, H, W) ids 0..C or 255 at the input
    resolution, shrunk to (h, w) by `nearest_label` (DeepLab-LargeFOV's choice: labels shrunk to
    the score map, not logits upsampled). Per image the loss is the mean over its non-ignored
    pixels (an image without any contributes 0); the images' losses are summed, so the trainer's
    rescale 1/batch_size gives the batch mean whatever the split over devices. Ignored pixels
    contribute no loss and no gradient. Returns a (1,) array.
    """
    target = F.BlockGrad(nearest_label(F, label, logits))
    valid = target != IGNORE_LABEL
    nll = -F.pick(F.log_softmax(logits, axis=1), target * valid, axis=1)       # (N, h, w)
    per_image = F.sum(nll * valid, axis=(1, 2)) / F.maximum(F.sum(valid, axis=(1, 2)), 1)
    return F.sum(per_image).reshape((1,))
