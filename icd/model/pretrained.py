"""Which ImageNet weights each registered network starts from, loading them, and the model-zoo
converter (docs/release.md sections 2 and 13).

A registration's `pretrained` entry (`icd.model.registry.Pretrained`, timm's pretrained_cfg)
names its ImageNet source: the VGG16 family the release's `vgg16_20M.params` (`VGG16_RELEASE`:
made from MXNet's model-zoo `vgg16` by `convert_vgg16` when the release's Google Drive file is
out of reach), `resnet101_largefov` gluoncv's `resnet101_v1b` as it is (`RESNET101_V1B`).
`imagenet_file` resolves an entry and a user's choice (a path, `modelzoo`, nothing) to a local
file; the model stores' cache folder is `default_root()` unless given. `initialize` starts a
VGG16-based network from a release-layout file by name; `describe_pretrained` says what a file
was made from, for the tables of a run.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Dict, Optional, Sequence, Union

import mxnet as mx
import numpy as np
from gluoncv.model_zoo import model_store as gluoncv_store
from mxnet.gluon import nn
from mxnet.gluon.model_zoo import model_store as mxnet_store, vision

from ..checkpoint import assign, read_params, release_key, release_keys, staged_params
from ..constants import MEAN_VALUE
from ..io import read_json, write_json
from .backbone import VGG16_BLOCKS, VGG16DeepLab, is_imagenet_key, new_parameter
from .registry import MODELS, Pretrained, model_spec

log = logging.getLogger(__name__)
MODELZOO = "modelzoo"    # `pretrained: modelzoo`: the registration's model-store file
STORES = {"mxnet": mxnet_store, "gluoncv": gluoncv_store}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the model stores' ImageNet networks take RGB / 255,
IMAGENET_STD = (0.229, 0.224, 0.225)   # then (x - mean) / std per channel
INPUT_SCALE = 64.0  # rough std of RGB - 127 inputs; see random_imagenet_params
# release: fc6_ft / fc7_ft start from the ImageNet fc6 / fc7 (section 2)
PRETRAINED_COPIES = {"fc6_ft_weight": "fc6_weight", "fc6_ft_bias": "fc6_bias",
                     "fc7_ft_weight": "fc7_weight", "fc7_ft_bias": "fc7_bias"}

VGG16_RELEASE = Pretrained(
    source="the release's vgg16_20M.params (VGG16, DeepLab-LargeFOV fc6/fc7 of 1024 channels, "
           "arg: keys, input RGB 0..255 - 127)",
    store="mxnet", store_name="vgg16", file="./data/vgg16_20M.params", convert=True)
RESNET101_V1B = Pretrained(
    source="gluoncv's ImageNet resnet101_v1b (input (RGB / 255 - mean) / std)",
    store="gluoncv", store_name="resnet101_v1b")

# DeepLab-LargeFOV's decimation of VGG16's fc6 / fc7 (section 13): fc6's 7x7 kernel keeps taps
# 0, 3, 6 in both directions (at dilation 12 = 3 x the 4 of pool5 run at stride 8), fc6 and fc7
# keep every 4th output channel from 0 (4096 -> 1024) and fc7 the matching input channels
ZOO_FC, ZOO_FC6_KERNEL, LARGEFOV_FC = 4096, 7, 1024
FC6_TAPS = (0, 3, 6)
FC_STEP = ZOO_FC // LARGEFOV_FC
DECIMATION = ("fc6 = W6.reshape(4096, 512, 7, 7)[::4, :, 0::3, 0::3], b6[::4]; "
              "fc7 = W7[::4, ::4] as 1x1, b7[::4]; conv1_1 folded for input RGB - 127")


def default_root() -> str:
    """The model stores' cache folder: $MXNET_HOME/models, else ~/.mxnet/models (MXNet's and
    gluoncv's default)."""
    return os.path.join(mx.base.data_dir(), "models")


def store_path(entry: Pretrained, root: Optional[str] = None) -> str:
    """Where the model store keeps `entry`'s file: `<root>/<name>-<short hash>.params`."""
    name = entry.store_name
    return os.path.join(os.path.expanduser(root or default_root()),
                        f"{name}-{STORES[entry.store].short_hash(name)}.params")


def store_file(entry: Pretrained, root: Optional[str] = None) -> str:
    """`entry`'s model-store file: the one in the cache folder `root` (default_root) if there,
    else downloaded there by the store (network). FileNotFoundError naming the path otherwise."""
    path = store_path(entry, root)
    if os.path.isfile(path):
        return path
    try:
        return STORES[entry.store].get_model_file(entry.store_name, root=os.path.dirname(path))
    except Exception as e:   # the stores raise whatever their download raises
        reason = (str(e).strip().splitlines() or [""])[-1]
        raise FileNotFoundError(
            f"{path}: {entry.store}'s {entry.store_name} is not in the model store's cache and "
            f"could not be downloaded ({type(e).__name__}: {reason}); without network, put the "
            f"file there (or give --root its folder, or its path)") from None


def fetch_command(entry: Pretrained, out: Optional[str] = None) -> str:
    """How a user gets `entry`'s file (at `out`, by default where the configs expect it): the
    converter's command, or the model store."""
    if entry.convert:
        return f"icd-pretrained --from {MODELZOO}:{entry.store_name} --out {out or entry.file}"
    return (f"`pretrained: {MODELZOO}` (the model store downloads {entry.store_name} into "
            f"{default_root()}), or the path of a {entry.store_name} .params file")


def imagenet_file(model: str, choice: Union[None, bool, str],
                  root: Optional[str] = None) -> Optional[str]:
    """The local ImageNet file registered model `model` starts from, for the user's `choice`:
    None, False or '' (none: random initialisation), True or `modelzoo[:<name>]` (the
    registration's model-store file, `store_file` in the cache folder `root`), or a path
    (offline: a file the user has). Errors name the file and how to get it (`fetch_command`)."""
    if not choice:
        return None
    entry = model_spec(model).pretrained
    if entry is None:
        raise ValueError(f"{model}: has no ImageNet weights (pretrained {choice!r})")
    if choice is True or choice in (MODELZOO, f"{MODELZOO}:{entry.store_name}"):
        if entry.convert:
            raise ValueError(f"pretrained {choice!r}: {model} starts from {entry.source}, not "
                             f"from the model store's file as it is; make it with "
                             f"`{fetch_command(entry)}`")
        return store_file(entry, root)
    if not os.path.isfile(choice):
        raise FileNotFoundError(f"{choice}: ImageNet file of {model} not found ({entry.source}); "
                                f"get it with {fetch_command(entry)}")
    return choice


# ---------------------------------------------------------------------------------------------
# MXNet's model-zoo VGG16 -> the release's vgg16_20M.params (section 13)

def release_layout() -> Dict[str, tuple]:
    """Key -> shape of the release's `vgg16_20M.params`: conv1_1..conv5_3, fc6 (1024, 512, 3,
    3), fc7 (1024, 1024, 1, 1), weights and biases, `arg:` keys."""
    shapes = {release_key(n): p.shape
              for n, p in VGG16DeepLab(1.0, prefix="").collect_params().items()}
    shapes.update({"arg:fc6_weight": (LARGEFOV_FC, 512, 3, 3), "arg:fc6_bias": (LARGEFOV_FC,),
                   "arg:fc7_weight": (LARGEFOV_FC, LARGEFOV_FC, 1, 1),
                   "arg:fc7_bias": (LARGEFOV_FC,)})
    return shapes


def zoo_vgg16_names() -> Dict[str, str]:
    """Layer name of `mxnet.gluon.model_zoo.vision.vgg16` (`features.<i>`, from the network
    built) -> the release's layer: its convolutions in order are conv1_1..conv5_3, its two
    Dense layers fc6 and fc7 (the classifier `output` has no counterpart)."""
    convs = [f"conv{block}_{i}" for block, count, _, _ in VGG16_BLOCKS
             for i in range(1, count + 1)]
    dense = ["fc6", "fc7"]
    names = {}
    for index, layer in enumerate(vision.vgg16().features):
        if isinstance(layer, nn.Conv2D):
            names[f"features.{index}"] = convs.pop(0)
        elif isinstance(layer, nn.Dense):
            names[f"features.{index}"] = dense.pop(0)
    return names


def zoo_vgg16_shapes() -> Dict[str, tuple]:
    """Parameter name -> shape of a model-zoo VGG16 `.params` file (`save_parameters`)."""
    release = release_layout()
    zoo_shapes = {"fc6": (ZOO_FC, 512 * ZOO_FC6_KERNEL ** 2), "fc7": (ZOO_FC, ZOO_FC)}
    shapes = {}
    for layer, ours in zoo_vgg16_names().items():
        shapes[f"{layer}.weight"] = zoo_shapes.get(ours, release[f"arg:{ours}_weight"])
        shapes[f"{layer}.bias"] = (zoo_shapes[ours][0],) if ours in zoo_shapes \
            else release[f"arg:{ours}_bias"]
    return shapes


def _load(path: str) -> dict:
    """`mx.nd.load` of `path` with errors naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: parameter file not found")
    try:
        return mx.nd.load(path)
    except mx.base.MXNetError as e:
        # MXNet's message is a C++ traceback; its last line says what is wrong
        reason = str(e).strip().splitlines()[-1].replace("MXNetError: ", "")
        raise ValueError(f"{path}: not an MXNet parameter file ({reason})") from None


def _mismatch(path: str, values: dict, expected: Dict[str, tuple], allowed_extra: str = ""
              ) -> list:
    """What keeps `values` from having exactly the keys and shapes `expected`: missing, extra
    (other than names starting with `allowed_extra`) and mis-shaped keys."""
    missing = sorted(set(expected) - set(values))
    extra = sorted(k for k in set(values) - set(expected)
                   if not (allowed_extra and k.startswith(allowed_extra)))
    wrong = sorted(f"{k} {tuple(values[k].shape)} (expected {expected[k]})"
                   for k in expected if k in values and tuple(values[k].shape) != expected[k])
    return [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''} ({len(keys)})"
            for what, keys in (("missing keys", missing), ("extra keys", extra),
                               ("mis-shaped keys", wrong)) if keys]


def read_zoo_vgg16(path: str) -> Dict[str, np.ndarray]:
    """The parameters of a model-zoo VGG16 file, as float32 numpy arrays; ValueError naming the
    file when it is not one (another architecture, a truncated or foreign file)."""
    loaded = _load(path)
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a model-zoo parameter file (a list of arrays, no names)")
    problems = _mismatch(path, loaded, zoo_vgg16_shapes(), allowed_extra="output.")
    if problems:
        raise ValueError(f"{path}: not mxnet.gluon.model_zoo.vision.vgg16's parameters; "
                         + "; ".join(problems))
    return {k: v.asnumpy().astype(np.float32) for k, v in loaded.items()
            if not k.startswith("output.")}


def fold_input(weight: np.ndarray, bias: np.ndarray) -> tuple:
    """conv1_1 of a network fed x = (RGB / 255 - mean) / std as the same convolution fed RGB
    0..255 - 127 (the release): x_c = r_c / (255 std_c) + (127 - 255 mean_c) / (255 std_c) for
    r = RGB - 127, so W'[:, c] = W[:, c] / (255 std_c) and b' = b + sum over c and the taps of
    W[:, c] (127 - 255 mean_c) / (255 std_c). Exact wherever the kernel lies in the image."""
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    scale = 1.0 / (255.0 * std)
    shift = (MEAN_VALUE - 255.0 * mean) / (255.0 * std)
    w = weight.astype(np.float64)
    folded_bias = bias + np.einsum("ocyx,c->o", w, shift)
    return (w * scale[None, :, None, None]).astype(np.float32), folded_bias.astype(np.float32)


def decimate_fc(fc6_weight: np.ndarray, fc6_bias: np.ndarray, fc7_weight: np.ndarray,
                fc7_bias: np.ndarray) -> Dict[str, np.ndarray]:
    """VGG16's fc6 (4096 x 512x7x7) and fc7 (4096 x 4096) as DeepLab-LargeFOV's fc6 (1024, 512,
    3, 3) and fc7 (1024, 1024, 1, 1) by decimation (`DECIMATION`, section 13)."""
    taps = list(FC6_TAPS)
    kernel = fc6_weight.reshape(ZOO_FC, 512, ZOO_FC6_KERNEL, ZOO_FC6_KERNEL)
    fc6 = kernel[::FC_STEP][:, :, taps][:, :, :, taps]
    fc7 = fc7_weight[::FC_STEP, ::FC_STEP]
    return {"arg:fc6_weight": np.ascontiguousarray(fc6), "arg:fc6_bias": fc6_bias[::FC_STEP],
            "arg:fc7_weight": np.ascontiguousarray(fc7)[:, :, None, None],
            "arg:fc7_bias": fc7_bias[::FC_STEP]}


def zoo_vgg16_to_release(zoo: Dict[str, np.ndarray]) -> Dict[str, mx.nd.NDArray]:
    """A model-zoo VGG16's parameters (`read_zoo_vgg16`) in the release's layout
    (`release_layout`): convolutions renamed, conv1_1 folded (`fold_input`), fc6/fc7 decimated
    (`decimate_fc`)."""
    values, fc = {}, {}
    for layer, ours in zoo_vgg16_names().items():
        weight, bias = zoo[f"{layer}.weight"], zoo[f"{layer}.bias"]
        if ours.startswith("fc"):
            fc[f"{ours}_weight"], fc[f"{ours}_bias"] = weight, bias
            continue
        if ours == "conv1_1":
            weight, bias = fold_input(weight, bias)
        values[f"arg:{ours}_weight"], values[f"arg:{ours}_bias"] = weight, bias
    values.update(decimate_fc(**fc))
    return {k: mx.nd.array(v, dtype=np.float32) for k, v in values.items()}


def _digests(path: str) -> Dict[str, str]:
    """SHA-256 (ours) and SHA-1 (the model stores' tables) of the bytes of `path`."""
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha256.update(block)
            sha1.update(block)
    return {"sha256": "sha256:" + sha256.hexdigest(), "sha1": sha1.hexdigest()}


def metadata_path(path: str) -> str:
    """The record beside an ImageNet file made here: `<path>.json`."""
    return path + ".json"


def convert_vgg16(source: str, out: str) -> dict:
    """Write the release's `vgg16_20M.params` layout made from the model-zoo VGG16 file `source`
    to `out` (atomically, `mx.nd.save`), with its record `<out>.json` (source, its SHA-256,
    whether its SHA-1 is the model store's, the rule, the file's own SHA-256); returns the
    record. ValueError naming `source` when it is not a model-zoo VGG16 file."""
    values = zoo_vgg16_to_release(read_zoo_vgg16(source))
    digests = _digests(source)
    expected = STORES[VGG16_RELEASE.store].short_hash(VGG16_RELEASE.store_name)
    record = {"made_from": f"{VGG16_RELEASE.store} model zoo {VGG16_RELEASE.store_name}",
              "source": os.path.abspath(source), "source_sha256": digests["sha256"],
              "source_is_model_store_file": digests["sha1"].startswith(expected),
              "rule": DECIMATION + " (docs/release.md section 13)"}
    if not record["source_is_model_store_file"]:
        log.warning("%s: its SHA-1 %s is not the model store's %s... (a file from elsewhere, or "
                    "edited); converted as it is", source, digests["sha1"], expected)
    with staged_params(values, out) as digest:
        record["sha256"] = digest
        write_json(metadata_path(out), record)
    return record


def describe_pretrained(path: str) -> dict:
    """What the ImageNet file `path` was made from, for a run's tables: `made_from` from its
    record (`convert_vgg16`), "<store> model store <name>" for a model store's own file (by its
    name and SHA-1), "release file" for a file of the release's layout without a record (the
    release's own, or one made elsewhere: nothing tells them apart), else "unknown"; with the
    file's `sha256`."""
    digests = _digests(path)
    found = {"file": path, "sha256": digests["sha256"]}
    record_path = metadata_path(path)
    if os.path.isfile(record_path):
        record = read_json(record_path)
        if record.get("sha256") == digests["sha256"]:
            return {**record, **found}
        return {**found, "made_from": "unknown",
                "note": f"{record_path} records another file (SHA-256 {record.get('sha256')})"}
    for entry in {spec.pretrained for spec in MODELS.values() if spec.pretrained}:
        if os.path.basename(path) == os.path.basename(store_path(entry)) and \
                digests["sha1"].startswith(STORES[entry.store].short_hash(entry.store_name)):
            return {**found, "made_from": f"{entry.store} model store {entry.store_name}"}
    values = _load(path)
    if isinstance(values, dict) and not _mismatch(path, values, release_layout()):
        return {**found, "made_from": "release file"}
    return {**found, "made_from": "unknown"}


# ---------------------------------------------------------------------------------------------
# Initialisation of the VGG16-based networks from a release-layout file (section 2)

def random_imagenet_params(net: mx.gluon.Block) -> Dict[str, mx.nd.NDArray]:
    """Stand-in for `vgg16_20M.params` when no weights are available (synthetic demo, tests).

    He-normal weights and zero biases for the layers the ImageNet file would provide (conv*,
    fc6, fc7). conv1_1 is divided by INPUT_SCALE because the input is RGB - 127 with no std
    scaling (release), so the first activations keep unit scale as after ImageNet training.
    """
    values = {}
    for key, shape in release_keys(net).items():
        name = key[4:]
        if not is_imagenet_key(key):
            continue
        if name.endswith("_bias"):
            values[key] = mx.nd.zeros(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            scale = INPUT_SCALE if name == "conv1_1_weight" else 1.0
            values[key] = mx.nd.random.normal(0, np.sqrt(2.0 / fan_in) / scale, shape=shape)
    return values


def initialize(net: mx.gluon.Block, contexts: Sequence[mx.Context],
               pretrained: Optional[str] = None) -> None:
    """Initialise `net` for training (release section 2).

    The ImageNet part comes from `pretrained` (the release's `vgg16_20M.params`, or one made by
    `convert_vgg16`: backbone, fc6, fc7) or, without a file, from `random_imagenet_params`.
    fc6_ft/fc7_ft are copied from fc6/fc7; every other parameter by its name's suffix
    (`new_parameter`: weights ~ N(0, 0.01), biases and beta 0, gamma 1, so also the backbone
    BatchNorms of `vgg16_bn_cam`); aux states start at BN defaults and a zero sign-flip mean.
    """
    source = pretrained or "random initialisation"
    values = dict(read_params(pretrained)) if pretrained \
        else random_imagenet_params(net)
    expected = release_keys(net)
    for dst, src in PRETRAINED_COPIES.items():
        # (only where shapes agree: fc6_ft on fc6 or concat features is a new layer)
        source_value = values.get(f"arg:{src}")
        if source_value is not None and expected.get(f"arg:{dst}") == source_value.shape:
            values[f"arg:{dst}"] = source_value.copy()
    extra = sorted(set(values) - set(expected))
    if extra:
        log.info("%s: not used by the model: %s", source, ", ".join(extra))
        values = {k: v for k, v in values.items() if k in expected}
    net.initialize(ctx=list(contexts), force_reinit=True)   # aux states: BN defaults, mean 0
    missing = assign(net, values, source, contexts, allow_missing=True)
    params = {release_key(n): p for n, p in net.collect_params().items()}
    new = [k for k in missing if k.startswith("arg:")]
    for key in new:
        params[key].set_data(new_parameter(key[4:], params[key].shape))
    log.info("%s: initialised by name (weights N(0, 0.01), biases and beta 0, gamma 1): %s",
             source, ", ".join(new))
