"""Speed and memory of a training step and of inference (benchmark, not a test).

Times, in one process and interleaved repetition by repetition, the training loop's step
(icd.engine.loop.train_step with the task's forward and loss) of ICDNet, of the CAM-only network
and of DeepLab-LargeFOV (the segmentation task), and the release's graph from symbols/, on the
same images; reports the median seconds, images/s, the multiply-accumulate count of each graph,
the share of the ICD step spent outside convolutions (custom operators and losses, from MXNet's
profiler) and, from one child process per network, the peak resident memory of the step (and,
on a GPU, the device memory MXNet holds after it). The training loader's throughput (images/s:
JPEG decoding, augmentation, uint8 batches from its worker processes) is measured on a synthetic
VOC-layout set of `loader_size` px images and compared with the ICD step's: below 1, the devices
wait for data.
"""
from __future__ import annotations

import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import mxnet as mx
import numpy as np

from . import amp, memory
from .checkpoint import gather
from .config import Config, find_config, read_config_sources
from .data.classes import read_classes
from .data.dataset import default_workers, train_loader
from .data.superpixels import make_superpixels
from .data.synthetic import make_synthetic_voc
from .data.voc import IGNORE_LABEL
from .engine import loop
from .model import build_model
from .model.pretrained import initialize
from .tasks import SegmentationTask, task_for

NETWORKS = ("icd", "cam", "reference", "infer", "deeplab")
AMP_NETWORKS = ("icd", "infer")   # timed again in the low precision of `run(amp=...)`
MODELS = {"icd": "vgg16_icd", "cam": "vgg16_cam", "infer": "vgg16_icd",
          "deeplab": "vgg16_largefov"}
_LAYERS = ("Convolution", "Pooling", "Activation", "Dropout", "Concat", "BatchNorm",
           "sgd_mom_update", "_copyto", "CopyCPU2CPU", "CopyGPU2GPU", "CopyCPU2GPU",
           "CopyGPU2CPU")


def make_batch(batch: int, size: int, num_classes: int, ctx: mx.Context):
    """Random RGB 0..255 images, blocky superpixels (<= 64 ids), one or two labels each and a
    blocky label map (ids 0..num_classes, some 255) for the segmentation step."""
    rng = np.random.RandomState(0)
    data = rng.uniform(0, 255, (batch, 3, size, size)).astype(np.float32)
    grid = rng.randint(0, 64, (batch, 8, 8))
    superpixel = np.kron(grid, np.ones((size // 8 + 1, size // 8 + 1)))[:, :size, :size]
    label = np.zeros((batch, num_classes), np.float32)
    for n in range(batch):
        label[n, rng.choice(num_classes, 1 + n % 2, replace=False)] = 1
    mask = superpixel % (num_classes + 2)
    mask[mask == num_classes + 1] = IGNORE_LABEL
    return {k: mx.nd.array(v, ctx=ctx) for k, v in
            (("data", data), ("superpixel", superpixel.astype(np.float32)), ("label", label),
             ("mask", mask.astype(np.float32)))}


def loop_step(model: str, batch: Dict[str, mx.nd.NDArray], ctx: mx.Context,
              width: float = 1.0) -> Callable[[], None]:
    """One synchronous training step of a registered model as the training loop runs it: the
    engine's one step (icd.engine.loop.train_step, hybridized, static allocation) with the
    forward and loss of the model's task (icd.tasks.task_for: ICD with the top-down term at full
    weight, or segmentation on the label map `mask`); the network is the step's `net`."""
    net = build_model(model, num_classes=batch["label"].shape[1], width=width)
    initialize(net, [ctx])
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = loop.make_trainer(net, 1e-3, 0.9, 5e-4)
    task = task_for(Config(model=model))
    inputs = {"data": batch["data"], "label": batch["mask"]} \
        if isinstance(task, SegmentationTask) else dict(batch, warm=mx.nd.ones((1,), ctx=ctx))

    def step():
        loop.train_step(net, trainer, task.forward, [inputs], batch["data"].shape[0])
        mx.nd.waitall()
    step.net = net
    return step


def training_step(model: str, ctx: mx.Context, size: int, batch: int, width: float,
                  num_classes: int) -> Callable[[], None]:
    """The training step of any registered model (`loop_step`) on a batch of `make_batch`."""
    return loop_step(model, make_batch(batch, size, num_classes, ctx), ctx, width)


def release_graph():
    """(DATA_NAMES, get_symbol) of the release's graph, `symbols/icd_symbol.py` of a checkout
    (the tests' reference, not installed with the library): the benchmark's reference rows need
    a checkout."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(checkout, "symbols", "icd_symbol.py")) and \
            checkout not in sys.path:
        sys.path.append(checkout)   # an editable install: the checkout the library runs from
    try:
        from symbols.icd_symbol import DATA_NAMES, get_symbol
    except ImportError:
        raise RuntimeError("the release's graph (symbols/ of the repository) is not importable: "
                           "run the benchmark from a checkout (pip install -e)") from None
    return DATA_NAMES, get_symbol


def reference_step(batch: Dict[str, mx.nd.NDArray], ctx: mx.Context,
                   width: float = 1.0) -> Callable[[], None]:
    """One synchronous training step of the release's graph through Module (symbols/ of a
    checkout: `release_graph`)."""
    DATA_NAMES, get_symbol = release_graph()

    sym = get_symbol(batch["label"].shape[1], width, "train", warmup_iters=0)
    mod = mx.mod.Module(sym, data_names=DATA_NAMES, label_names=None, context=ctx)
    mod.bind(data_shapes=[(n, batch[n].shape) for n in DATA_NAMES], for_training=True)
    net = build_model("vgg16_icd", num_classes=batch["label"].shape[1], width=width)
    initialize(net, [ctx])
    values = gather(net)
    mod.init_params(arg_params={k[4:]: v for k, v in values.items() if k.startswith("arg:")},
                    aux_params={k[4:]: v for k, v in values.items() if k.startswith("aux:")})
    mod.init_optimizer(kvstore="device", optimizer="sgd", optimizer_params={
        "learning_rate": 1e-3, "momentum": 0.9, "wd": 5e-4,
        "rescale_grad": 1.0 / batch["data"].shape[0]})
    data_batch = mx.io.DataBatch([batch[n] for n in DATA_NAMES])

    def step():
        mod.forward(data_batch, is_train=True)
        mod.backward()
        mod.update()
        mx.nd.waitall()
    return step


def infer_step(batch: Dict[str, mx.nd.NDArray], ctx: mx.Context,
               width: float = 1.0) -> Callable[[], None]:
    """One inference pass of ICDNet (the release's inference: 513 input)."""
    net = build_model("vgg16_icd", num_classes=batch["label"].shape[1], width=width)
    initialize(net, [ctx])
    net.hybridize(static_alloc=True, static_shape=True)
    args = [batch["data"], batch["superpixel"], batch["label"], mx.nd.ones((1,), ctx=ctx)]

    def step():
        net(*args)
        mx.nd.waitall()
    return step


def build_step(name: str, ctx: mx.Context, size: int, infer_size: int, batch: int,
               width: float, num_classes: int) -> Callable[[], None]:
    if name == "infer":
        return infer_step(make_batch(1, infer_size, num_classes, ctx), ctx, width)
    data = make_batch(batch, size, num_classes, ctx)
    if name == "reference":
        return reference_step(data, ctx, width)
    return loop_step(MODELS[name], data, ctx, width)


def count_macs(sym: mx.sym.Symbol, input_shapes: Dict[str, tuple]) -> int:
    """Multiply-accumulates of every convolution of `sym` (batch as in `input_shapes`)."""
    internals = sym.get_internals()
    arg_shapes, out_shapes, _ = internals.infer_shape_partial(**input_shapes)
    shape_of = dict(zip(internals.list_outputs(), out_shapes))
    shape_of.update(zip(internals.list_arguments(), arg_shapes))
    nodes = json.loads(sym.tojson())["nodes"]
    macs = 0
    for node in nodes:
        if node["op"] == "Convolution":
            weight = nodes[node["inputs"][1][0]]
            weight_name = weight["name"] if weight["op"] == "null" else weight["name"] + "_output"
            macs += int(np.prod(shape_of[node["name"] + "_output"][1:])) * \
                int(np.prod(shape_of[weight_name][1:]))
    return macs


def graph_casts(net) -> Dict[str, int]:
    """In the graph `net` traces (symbolically: nothing runs), the casts AMP inserted
    (amp_cast, amp_multicast), the BatchNorms, and the BatchNorms whose data is a cast."""
    nodes = json.loads(mx.sym.Group(list(net(*[mx.sym.var(n) for n in net.input_names])))
                       .tojson(remove_amp_cast=False))["nodes"]
    casts = {i for i, node in enumerate(nodes) if node["op"] in ("amp_cast", "amp_multicast")}
    norms = [node for node in nodes if node["op"] == "BatchNorm"]
    return {"casts": len(casts), "batch_norms": len(norms),
            "batch_norms_after_a_cast": sum(node["inputs"][0][0] in casts for node in norms)}


def graph_macs(name: str, size: int, num_classes: int, width: float = 1.0) -> int:
    """MACs per image of a training step's forward graph (our networks or the reference)."""
    shapes = {"data": (1, 3, size, size), "superpixel": (1, size, size),
              "label": (1, num_classes), "warm": (1,)}
    if name == "reference":
        DATA_NAMES, get_symbol = release_graph()
        sym = get_symbol(num_classes, width, "train")
        return count_macs(sym, {n: shapes[n] for n in DATA_NAMES})
    net = build_model(MODELS[name], num_classes=num_classes, width=width)
    sym = mx.sym.Group(list(net(*[mx.sym.var(n) for n in net.input_names])))
    return count_macs(sym, {n: shapes[n] for n in net.input_names})


def custom_and_loss_share(step: Callable[[], None], repeats: int = 2) -> float:
    """Share of a step's operator time spent in the custom operators and the losses.

    From MXNet's profiler: the "Custom Operator" domain plus every executed operator segment
    holding none of the network's layers (convolution, pooling, activation, dropout, concat,
    BatchNorm) nor the optimizer update, over all operator time.
    """
    # the trace file goes to a folder of our own: MXNet's profiler deletes and recreates its
    # file, which for os.devnull run as root removed the machine's /dev/null
    with tempfile.TemporaryDirectory(prefix="icd-profile-") as folder:
        mx.profiler.set_config(profile_all=True, aggregate_stats=True, continuous_dump=False,
                               filename=os.path.join(folder, "profile.json"))
        mx.profiler.set_state("run")
        for _ in range(repeats):
            step()
        mx.profiler.set_state("stop")
        table = json.loads(mx.profiler.dumps(reset=True, format="json")).get("Time", {})
    custom = sum(s["Total"] for s in table.get("Custom Operator", {}).values())
    operators = table.get("operator", {})
    losses = sum(s["Total"] for name, s in operators.items()
                 if not any(layer in name for layer in _LAYERS))
    total = custom + sum(s["Total"] for s in operators.values())
    return (custom + losses) / total if total else float("nan")


def time_steps(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1
               ) -> Dict[str, List[float]]:
    """Seconds of each step, interleaved repetition by repetition after `warmup` runs."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return times


def loader_throughput(size: int, batch: int, workers: Optional[int] = None,
                      batches: int = 6, image_size: int = 400) -> Dict[str, float]:
    """Images/s of the training loader over `batches` batches after its first (worker start-up
    excluded): a synthetic VOC-layout set of `image_size` px images with colour superpixels is
    written to a temporary folder; `workers` None: the default (one per core)."""
    workers = default_workers() if workers is None else workers
    with tempfile.TemporaryDirectory(prefix="icd-bench-") as root:
        names = make_synthetic_voc(os.path.join(root, "voc"), num_train=batch * (batches + 1),
                                   num_val=0, size=image_size)
        images = os.path.join(root, "voc", "JPEGImages")
        data_list = os.path.join(root, "voc", "ImageSets", "Segmentation", "train.txt")
        make_superpixels(images, data_list, os.path.join(root, "sp"))
        loader = train_loader(images, os.path.join(root, "sp"), os.path.join(root, "voc",
                              "Annotations"), data_list, image_size=size, batch_size=batch,
                              num_workers=workers,
                              classes=read_classes(os.path.join(root, "voc", "classes.txt")))
        batches_seen, started, nbytes = -1, 0.0, 0
        for data, superpixel, label in loader:
            batches_seen += 1
            if batches_seen == 0:
                started = time.perf_counter()
                nbytes = sum(x.size * np.dtype(x.dtype).itemsize
                             for x in (data, superpixel, label))
        seconds = time.perf_counter() - started
    return {"workers": workers, "images": batches_seen * batch, "image_side": image_size,
            "images_per_s": batches_seen * batch / seconds if batches_seen else float("nan"),
            "bytes_per_batch": nbytes, "train_images": len(names["train"])}


def peak_memory_mb(name: str, ctx: str, size: int, infer_size: int, batch: int, width: float,
                   num_classes: int, precision: str = "off") -> Dict[str, float]:
    """Peak resident memory (VmHWM) of a child process that builds one network and runs two
    steps in `precision` (icd.amp), and its growth over the same process just before the first
    step (MiB; Linux); on a GPU also the device memory in use after the steps (MXNet's pool
    keeps the step's peak)."""
    before, after, device, _ = _child_memory(
        ctx, precision, f"bench.build_step({name!r}, ctx, {size}, {infer_size}, {batch}, "
                        f"{width}, {num_classes})")
    figures = {"peak_rss_mb": after, "step_growth_mb": after - before}
    if device is not None:
        figures["device_used_mb"] = device
    return figures


def _child_memory(ctx: str, precision: str, step: str) -> List[Optional[float]]:
    """[peak resident MiB before the first step, after two steps, device MiB in use (GPU) or
    None, MiB of the network's parameters] of a child process building `step` (an expression
    of `bench` and `ctx`) in `precision`."""
    code = ("import json; from icd import amp, bench; from icd.devices import parse_context;"
            f"ctx = parse_context({ctx!r}); amp.enable({precision!r}, [ctx]);"
            f"step = {step}; before = bench.high_water_mb(); step(); step();"
            "print(json.dumps([before, bench.high_water_mb(), bench.device_used_mb(ctx),"
            "                  bench.params_mb(getattr(step, 'net', None))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def params_mb(net) -> Optional[float]:
    """MiB of `net`'s parameters (None without a network)."""
    if net is None:
        return None
    return sum(p.data().size * np.dtype(p.data().dtype).itemsize
               for p in net.collect_params().values()) / 2 ** 20


def memory_per_image(model: str, ctx: str, size: int, width: float, num_classes: int
                     ) -> Dict[str, float]:
    """A training step's memory on a device, as icd.memory reads it, from the peak resident
    memory of steps of one and of two images (child processes): `per_image_mb` is their
    difference, `fixed_mb` the weights and gradients (held before the step) plus the first
    step's growth less one image (optimizer states, workspaces)."""
    runs = [_child_memory(ctx, "off", f"bench.training_step({model!r}, ctx, {size}, {batch}, "
                                      f"{width}, {num_classes})") for batch in (1, 2)]
    (before, one, _, weights), (_, two, _, _) = runs
    per_image = max(two - one, 0.0)
    return {"size": size, "width": width, "params_mb": weights, "per_image_mb": per_image,
            "fixed_mb": 2 * weights + (one - before) - per_image}


def shipped_configs() -> Dict[str, Dict[str, object]]:
    """{name: model, image_size, batch_size, width} of every shipped experiments/*.yaml."""
    defaults, configs = Config(), {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(find_config("voc_vgg16")),
                                              "*.yaml"))):
        values = read_config_sources(path)[0]
        configs[os.path.splitext(os.path.basename(path))[0]] = {
            k: values.get(k, getattr(defaults, k))
            for k in ("model", "image_size", "batch_size", "width")}
    return configs


def config_memory(figures: Dict[str, Dict[str, float]], devices: Sequence[int] = (1, 2)
                  ) -> Dict[str, Dict[str, object]]:
    """Each shipped config's estimated MiB per device (icd.memory.estimate_mb from `figures`,
    measured at one width: None for a config of another width), its batch split over 1 and 2
    devices."""
    estimates = {}
    for name, cfg in shipped_configs().items():
        measured = figures.get(cfg["model"])
        same_width = measured is not None and measured["width"] == cfg["width"]
        estimates[name] = dict(cfg, per_device_mb={
            str(d): memory.estimate_mb(cfg["model"], cfg["image_size"],
                                       math.ceil(cfg["batch_size"] / d), cfg["width"], figures)
            if same_width else None for d in devices})
    return estimates


def memory_report(ctx: str, size: int, width: float, num_classes: int) -> Dict[str, object]:
    """`memory_per_image` of every model of a shipped config, and `config_memory` from them."""
    models = sorted({cfg["model"] for cfg in shipped_configs().values()})
    figures = {m: memory_per_image(m, ctx, size, width, num_classes) for m in models}
    return {"models": figures, "configs": config_memory(figures)}


def device_used_mb(ctx: mx.Context) -> Optional[float]:
    """Memory in use on GPU `ctx` (total - free, MiB), None for a CPU context."""
    if ctx.device_type != "gpu":
        return None
    free, total = mx.context.gpu_memory_info(ctx.device_id)
    return (total - free) / 2 ** 20


def high_water_mb() -> float:
    """This process's peak resident memory so far (VmHWM of /proc/self/status), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("VmHWM not in /proc/self/status (the memory figures need Linux)")


def build_steps(ctx: mx.Context, size: int, infer_size: int, batch: int, width: float,
                num_classes: int, precision: str = "off") -> Dict[str, Callable[[], None]]:
    """Every network's step, run once (the warm-up); with a low `precision` also AMP_NETWORKS'
    in it, named <network>_<precision>.

    One process times both precisions, interleaved: amp.init (icd.amp.enable) changes only the
    graphs traced after it, so the float32 networks are built and run once before it (a
    hybridized network keeps the graph of its first call) and the low-precision ones after.
    """
    steps = {name: build_step(name, ctx, size, infer_size, batch, width, num_classes)
             for name in NETWORKS}
    if precision != "off":
        for step in steps.values():
            step()
        amp.enable(precision, [ctx])
        steps.update({f"{name}_{precision}": build_step(name, ctx, size, infer_size, batch,
                                                         width, num_classes)
                      for name in AMP_NETWORKS})
    return steps


def run(ctx: mx.Context, ctx_text: str, size: int = 321, infer_size: int = 513, batch: int = 2,
        width: float = 1.0, num_classes: int = 20, repeats: int = 5,
        memory: bool = True, loader_workers: Optional[int] = None,
        loader_size: int = 400, precision: str = "off") -> Dict[str, object]:
    """The whole benchmark; returns the JSON-ready report. `precision` bf16 / fp16 adds the
    ICD training step and inference in it (icd.amp), with their ratios to float32's."""
    steps = build_steps(ctx, size, infer_size, batch, width, num_classes, precision)
    times = time_steps(steps, repeats)
    report = {"context": ctx_text, "size": size, "infer_size": infer_size, "batch": batch,
              "width": width, "num_classes": num_classes, "repeats": repeats, "amp": precision,
              "networks": {}}
    for name, samples in times.items():
        network = name.split("_")[0]
        images = 1 if network == "infer" else batch
        report["networks"][name] = {
            "step_seconds_median": statistics.median(samples), "step_seconds": samples,
            "images_per_s": images / statistics.median(samples),
            "macs_per_image": graph_macs(network, infer_size if network == "infer" else size,
                                         num_classes, width)}
    net = report["networks"]
    for name in AMP_NETWORKS if precision != "off" else ():
        report[f"{name}_float32_over_{precision}_time"] = net[name]["step_seconds_median"] / \
            net[f"{name}_{precision}"]["step_seconds_median"]
    report["icd_over_cam_time"] = net["icd"]["step_seconds_median"] / \
        net["cam"]["step_seconds_median"]
    report["icd_over_cam_macs"] = net["icd"]["macs_per_image"] / net["cam"]["macs_per_image"]
    report["ours_over_reference_time"] = net["icd"]["step_seconds_median"] / \
        net["reference"]["step_seconds_median"]
    report["deeplab_over_cam_time"] = net["deeplab"]["step_seconds_median"] / \
        net["cam"]["step_seconds_median"]
    report["deeplab_over_cam_macs"] = net["deeplab"]["macs_per_image"] / \
        net["cam"]["macs_per_image"]
    report["icd_custom_and_loss_share"] = custom_and_loss_share(steps["icd"])
    report["reference_custom_and_loss_share"] = custom_and_loss_share(steps["reference"])
    report["loader"] = loader_throughput(size, batch, loader_workers, image_size=loader_size)
    report["loader_over_icd_step"] = report["loader"]["images_per_s"] / \
        net["icd"]["images_per_s"]
    if memory:
        for name in net:
            network, _, low = name.partition("_")
            net[name].update(peak_memory_mb(network, ctx_text, size, infer_size, batch, width,
                                            num_classes, low or "off"))
        report["memory"] = memory_report(ctx_text, size, width, num_classes)
    return report
