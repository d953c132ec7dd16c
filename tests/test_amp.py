"""Mixed precision (icd.amp, --amp): the refusals, fp16's dynamic loss scaling, and bf16 training
and inference where the CPU has native bfloat16.

amp.init changes the whole process, so everything that enables a precision runs in a child
process; this one stays float32.
"""
import json
import os
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest

from icd import amp
from icd.commands.train import main as train_main
from icd.tasks import train

NATIVE_BF16 = amp.unsupported_reason("bf16", [mx.cpu()])
needs_bf16 = pytest.mark.skipif(NATIVE_BF16 is not None,
                                reason=f"bfloat16 cannot run here: {NATIVE_BF16}")


def run_python(code: str, timeout: int = 600) -> str:
    """Run `code` in a new Python process; its stdout (the test fails with its stderr)."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def train_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from icd.commands.train import "
                           "main; sys.exit(main(sys.argv[1:]))", *args],
                          capture_output=True, text=True, timeout=600)


def test_each_precision_is_refused_where_it_cannot_run(monkeypatch):
    cpus, gpus = [mx.cpu(0), mx.cpu(1)], [mx.gpu(0)]
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(amp, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert amp.unsupported_reason("off", cpus) is None
    assert "no native bfloat16" in amp.unsupported_reason("bf16", cpus)
    assert "needs GPUs" in amp.unsupported_reason("fp16", cpus)
    assert amp.unsupported_reason("fp16", gpus) is None
    assert "only on CPUs" in amp.unsupported_reason("bf16", gpus)
    assert "needs GPUs" in amp.unsupported_reason("fp16", [mx.gpu(0), mx.cpu(0)])
    monkeypatch.setattr(amp, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert amp.unsupported_reason("bf16", cpus) is None
    assert amp.supported_precisions(cpus) == {
        "off": None, "bf16": None, "fp16": amp.unsupported_reason("fp16", cpus)}
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")   # the cap makes oneDNN emulate bfloat16
    assert "DNNL_MAX_CPU_ISA=AVX2" in amp.unsupported_reason("bf16", cpus)
    with pytest.raises(ValueError, match="--amp bf16: DNNL_MAX_CPU_ISA=AVX2"):
        amp.enable("bf16", cpus)
    amp.enable("off", cpus)                         # float32 needs nothing
    assert amp.enabled() == "off"


def test_the_flags_are_read_from_the_real_cpuinfo_format(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert amp.cpu_flags(str(cpuinfo)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert amp.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_training_refuses_fp16_on_cpus_before_writing_anything(tiny_config, capsys):
    cfg = tiny_config()
    status = train_main(["--image-root", cfg.image_root, "--annotation-root",
                         cfg.annotation_root, "--superpixel-root", cfg.superpixel_root,
                         "--data-list", cfg.data_list, "--width", "0.0625", "--image-size",
                         "32", "--batch-size", "4", "--num-workers", "0", "--snapshot",
                         cfg.snapshot, "--amp", "fp16"])
    assert status == 1
    assert "--amp fp16: float16 needs GPUs" in capsys.readouterr().err
    assert not os.path.exists(cfg.snapshot) or not [
        f for f in os.listdir(cfg.snapshot) if f.endswith((".params", ".json"))]
    assert amp.enabled() == "off"


# fp16 loss scaling on cpu(1), cpu(2): each run's steps (gradients, weights, their change and
# the scaler's state) as JSON, fp16 with an overflow on the second device at step 2, fp32
TWO_DEVICE_SCALING = """
        import json
        import mxnet as mx
        from mxnet import autograd, gluon
        from mxnet.contrib import amp as mx_amp
        from icd import amp
        from icd.engine import make_trainer
        mx_amp.init(target_dtype="float16")
        contexts = [mx.cpu(1), mx.cpu(2)]

        class Scale(gluon.HybridBlock):
            def __init__(self):
                super().__init__()
                self.w = self.params.get("w", shape=(4,), init=mx.init.Constant(0.5))
            def hybrid_forward(self, F, x, w):
                return F.broadcast_mul(x, w)

        def run(precision, factors):
            net = Scale(); net.initialize(ctx=contexts); net.hybridize()
            trainer = make_trainer(net, 0.1, 0.9, 0.0, "sgd", "device", precision,
                                   {"loss_scale": 8.0, "next_loss_scale": 8.0, "unskipped": 3,
                                    "skipped_steps": 2})
            rows = []
            for pair in factors:
                with autograd.record():
                    losses = [(net(mx.nd.ones((1, 4), ctx=c)) * f).sum()
                              for c, f in zip(contexts, pair)]
                before = [w.copy() for w in net.w.list_data()]
                amp.backward(losses, trainer)
                grads = [g.asnumpy().tolist() for g in net.w.list_grad()]
                trainer.step(2)
                rows.append(dict(grads=grads, weights=[w.asnumpy().tolist()
                                                       for w in net.w.list_data()],
                                 change=[(w - b).asnumpy().tolist()
                                         for w, b in zip(net.w.list_data(), before)],
                                 **amp.trainer_state(trainer)))
            return rows

        print(json.dumps(dict(fp16=run("fp16", [(1, 1), (1, 1e38), (1, 1)]),
                              fp32=run("off", [(1, 1), (1, 1)]))))
    """


def test_fp16_loss_scaling_on_two_devices_skips_an_overflow_of_either_and_resumes_its_scale():
    """The fp16 path's own logic on cpu(1), cpu(2) (a Trainer on several devices: Gluon would
    update inside the kvstore): AMP initialised for float16 around a network of float32-only
    operators (CPUs have no float16 dense/convolution kernels). Only the second device's
    gradient overflows: the step changes no weight on either device and no momentum (the next
    step equals float32's second step), and counts one skip."""
    out = run_python(TWO_DEVICE_SCALING)
    found = json.loads(out.strip().splitlines()[-1])
    (clean, overflow, after), reference = found["fp16"], found["fp32"]
    # each device's gradient is scaled by the resumed scale 8 (1 image x 1 x 8); the step sums
    # them, unscales and rescales by 1/2 images: SGD with momentum 0.9 from 0.5
    assert clean["grads"] == [[8.0] * 4] * 2
    assert clean["weights"] == reference[0]["weights"] and np.allclose(clean["change"], -0.1)
    assert clean["loss_scale"] == 8.0 and clean["unskipped"] == 4 and clean["skipped_steps"] == 2
    # the second device's gradient is infinite: nothing moves on either device, one skip, the
    # scale halves from the step after next (MXNet's scaler chooses one step ahead)
    assert overflow["change"] == [[0.0] * 4] * 2 and overflow["skipped_steps"] == 3
    assert overflow["loss_scale"] == 8.0 and overflow["next_loss_scale"] == 4.0
    assert overflow["unskipped"] == 0
    # the momentum was kept too: the next step is float32's second step
    assert after["weights"] == reference[1]["weights"]
    assert np.allclose(after["change"], -0.19) and after["grads"] == [[8.0] * 4] * 2
    assert after["loss_scale"] == 4.0 and after["skipped_steps"] == 3
    assert reference[0].get("loss_scale") is None   # float32 has no scaler


def test_the_loss_scale_doubles_after_2000_clean_steps_up_to_its_ceiling():
    """MXNet's LossScaler rule on the device: the next scale doubles after SCALE_SEQ_LEN clean
    steps (and the count restarts), never above MAX_LOSS_SCALE."""
    scaler = amp.DeviceLossScaler([mx.cpu(1)], {"loss_scale": 4.0, "unskipped": 1998})
    ok = [mx.nd.ones((1,), ctx=mx.cpu(1))]
    scaler.advance(ok)
    assert scaler.state() == {"loss_scale": 4.0, "next_loss_scale": 4.0, "unskipped": 1999,
                              "skipped_steps": 0}
    scaler.advance(ok)
    assert scaler.state()["next_loss_scale"] == 8.0 and scaler.state()["unskipped"] == 0
    top = amp.DeviceLossScaler([mx.cpu(1)], {"loss_scale": amp.MAX_LOSS_SCALE,
                                             "unskipped": 1999})
    top.advance(ok)
    assert top.state()["next_loss_scale"] == amp.MAX_LOSS_SCALE


def test_fp16_graphs_leave_batch_norm_to_its_input_without_casts():
    """MXNet's fp16 lists let BatchNorm run on float16 data (float32 parameters and
    statistics): no cast in or out of any BatchNorm, the graphs type-check, and the casts of
    the fp16 graphs (traced on CPU, nothing runs) drop from 566 to 254 in resnet101_largefov
    (104 BatchNorms) and from 94 to 55 in vgg16_bn_cam (13)."""
    out = run_python("""
        import json
        import mxnet as mx
        from icd import amp, bench
        from icd.model import build_model
        amp.rewrite("fp16")
        found = {}
        for name, classes in (("resnet101_largefov", 21), ("vgg16_bn_cam", 20)):
            net = build_model(name, num_classes=classes)
            found[name] = bench.graph_casts(net)
            outputs = net(*[mx.sym.var(n) for n in net.input_names])
            internals = mx.sym.Group(list(outputs) if isinstance(outputs, tuple)
                                     else [outputs]).get_internals()
            _, types, _ = internals.infer_type(**dict.fromkeys(net.input_names, "float32"))
            norms = {node["name"] + "_output" for node in json.loads(
                internals.tojson(remove_amp_cast=False))["nodes"] if node["op"] == "BatchNorm"}
            found[name]["batch_norm_outputs"] = sorted({
                t.__name__ for n, t in zip(internals.list_outputs(), types) if n in norms})
        print(json.dumps(found))
    """)
    found = json.loads(out.strip().splitlines()[-1])
    assert found["resnet101_largefov"] == {"casts": 254, "batch_norms": 104,
                                           "batch_norms_after_a_cast": 0,
                                           "batch_norm_outputs": ["float16"]}
    assert found["vgg16_bn_cam"] == {"casts": 55, "batch_norms": 13,
                                     "batch_norms_after_a_cast": 0,
                                     "batch_norm_outputs": ["float16"]}


@needs_bf16
def test_bf16_runs_convolutions_in_bfloat16_and_leaves_earlier_graphs_float32():
    """What icd-bench relies on (a network traced before amp.init keeps float32) and what
    --amp bf16 does: the convolutions' outputs (the CAM) in bfloat16, the outputs of the custom
    operators and the losses in float32, all near float32's but not equal."""
    out = run_python("""
        import json
        import mxnet as mx
        import numpy as np
        from icd import amp, bench
        from icd.model.pretrained import initialize
        from icd.model import build_model
        ctx = mx.cpu()
        batch = bench.make_batch(2, 64, 20, ctx)
        args = [batch["data"], batch["superpixel"], batch["label"], mx.nd.ones((1,), ctx=ctx)]

        def network():
            net = build_model("vgg16_icd", num_classes=20, width=0.125)
            mx.random.seed(0)
            initialize(net, [ctx])
            net.hybridize(static_alloc=True, static_shape=True)
            return net

        first = network()
        before = [o.asnumpy() for o in first(*args)]
        amp.enable("bf16", [ctx])
        again = [o.asnumpy() for o in first(*args)]
        second = network()
        outputs = second(*args)
        low = [o.astype("float32").asnumpy() for o in outputs]
        print(json.dumps(dict(
            same=all(np.array_equal(a, b) for a, b in zip(before, again)),
            rel=[float(np.abs(a - b).max() / (np.abs(a).max() + 1e-12))
                 for a, b in zip(before, low)],
            before=sorted({o.dtype.name for o in before}),
            dtypes={n: np.dtype(o.dtype).names[0] if np.dtype(o.dtype).names
                    else np.dtype(o.dtype).name for n, o in zip(second.output_names, outputs)})))
    """)
    found = json.loads(out.strip().splitlines()[-1])
    assert found["same"]
    assert found["before"] == ["float32"]
    dtypes = found["dtypes"]
    assert dtypes["cam"] == "bfloat16" and dtypes["loss"] == "float32", dtypes
    assert all(0 < r < 0.1 for r in found["rel"]), found["rel"]


@needs_bf16
def test_bf16_training_resumes_bit_exactly_and_keeps_float32_checkpoints(tiny_config, tmp_path):
    cfg = tiny_config()
    data = ["--image-root", cfg.image_root, "--annotation-root", cfg.annotation_root,
            "--superpixel-root", cfg.superpixel_root, "--data-list", cfg.data_list,
            "--width", "0.0625", "--image-size", "32", "--batch-size", "4", "--num-workers",
            "0", "--dropout", "0", "--log-frequency", "1", "--amp", "bf16"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    for args in (["--snapshot", whole, "--num-epoch", "2"],
                 ["--snapshot", parts, "--num-epoch", "1"],
                 ["--snapshot", parts, "--num-epoch", "2", "--resume", "auto"]):
        result = train_command(*data, *args)
        assert result.returncode == 0, result.stderr[-2000:]
    a = mx.nd.load(os.path.join(whole, "vgg16_icd-0001.params"))
    b = mx.nd.load(os.path.join(parts, "vgg16_icd-0001.params"))
    assert sorted(a) == sorted(b) and all(v.dtype == np.float32 for v in a.values())
    assert all(np.array_equal(a[k].asnumpy(), b[k].asnumpy()) for k in a)
    with open(os.path.join(whole, "vgg16_icd-log.json")) as f:
        log = json.load(f)
    assert [r["amp"] for r in log] == ["bf16", "bf16"]
    assert all(np.isfinite(r["cam_loss"]) and np.isfinite(r["td_loss"]) for r in log)
    # a float32 checkpoint continues in bf16 and back: precision is free on resume; the NaN
    # stop still stops a diverging bf16 run
    switched = train_command(*data[:-1], "off", "--snapshot", whole, "--num-epoch", "3",
                             "--resume", "auto")
    assert switched.returncode == 0, switched.stderr[-2000:]
    diverged = train_command(*data, "--snapshot", whole, "--num-epoch", "4", "--begin-epoch",
                             "3", "--learning-rate", "1e30", "--allow-changes")
    assert diverged.returncode == 3 and "loss became NaN or infinite" in diverged.stderr
    assert not os.path.exists(os.path.join(whole, "vgg16_icd-0003.params"))


@needs_bf16
def test_bf16_inference_writes_float32_scores_and_records_its_precision(tiny_config, tiny_voc,
                                                                        tmp_path):
    cfg = tiny_config(num_epoch=1)
    train(cfg)
    flags = ["--image-root", cfg.image_root, "--annotation-root", cfg.annotation_root,
             "--superpixel-root", cfg.superpixel_root, "--data-list", cfg.data_list,
             "--width", "0.0625", "--num-workers", "0", "--infer-size", "64",
             "--infer-batch-size", "2", "--snapshot", cfg.snapshot, "--epoch", "0",
             "--out", str(tmp_path / "scores")]
    infer = ["import sys; from icd.commands.infer import main; sys.exit(main(sys.argv[1:]))"]
    low = subprocess.run([sys.executable, "-c", *infer, *flags, "--amp", "bf16"],
                         capture_output=True, text=True, timeout=600)
    assert low.returncode == 0, low.stderr[-2000:]
    folder = tmp_path / "scores" / "scores_icd"
    names = sorted(os.listdir(folder))
    assert names and all(np.load(folder / n).dtype == np.float32 for n in names)
    with open(str(folder) + ".provenance.json") as f:
        assert json.load(f)["settings"]["amp"] == "bf16"
    # float32 scores are other results: refused into the bf16 folder, naming the change
    again = subprocess.run([sys.executable, "-c", *infer, *flags], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 1 and "amp" in again.stderr
