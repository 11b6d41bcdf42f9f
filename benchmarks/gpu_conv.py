"""Our CUDA convolution kernels against cuDNN (through PyTorch) on 13 ResNet-50 and VGG-16 layers.

For each layer and pass (forward, data gradient, weight gradient): the median time over timed
launches after warm-up (CUDA events around each launch), TFLOP/s, the share of the H100's
peak in that precision (float32 66.9 TFLOP/s; dense tensor cores TF32 495, bf16 and fp16 989),
and cuDNN's time (cudnn.benchmark on) in the same precision with NCHW and channels_last tensors;
in float32 also with TF32 on (cuDNN on tensor cores, what a TF32 kernel of ours faces). The
like-for-like ratio is ours / cuDNN NCHW in the same precision (our kernels are NCHW); `best`
is ours / the faster of cuDNN's two layouts. Geometric means per pass. Our passes include what
they launch: the data gradient its weight transpose, the weight gradient its split-K reduction;
no bias.

`--precision tf32|bf16|fp16` runs all three passes of ours on the tensor cores (conv.MMA_CONFIGS:
float32 tensors, operands rounded in registers) against cuDNN with TF32 allowed, or on bf16 /
fp16 tensors (what autocast runs; cuDNN also reads half the bytes). Each result is checked
against cuDNN's float32 output (relative error norm, within the precision's tolerance).

    python benchmarks/gpu_conv.py                   # all 13 layers, tuner "fast"
    python benchmarks/gpu_conv.py --autotune off    # the cost model's first configuration
    python benchmarks/gpu_conv.py --layers r50_l1_3x3,vgg16_conv5 --json results/gpu_conv.json
    python benchmarks/gpu_conv.py --dry-run         # the measurements it would make; no GPU needed
    python benchmarks/gpu_conv.py --precision bf16  # our tensor-core passes against cuDNN bf16

Needs an NVIDIA GPU, CuPy and PyTorch with CUDA; says so and exits with status 2 otherwise.
Not a test: timings vary. Prints the table last; `--json PATH` (or `-` for stdout) writes the
records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

PEAK_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}  # H100 SXM dense peaks
TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 3e-2, "fp16": 5e-3}  # against cuDNN float32 (rounded operands)

# from the project's shared reference/conv_layers.json: ResNet-50 and VGG-16 layers
LAYERS = [
    dict(name="r50_conv1", N=64, C=3, H=224, W=224, K=64, R=7, S=7, stride=2, pad=3, gflop=15.11),
    dict(name="r50_l1_3x3", N=64, C=64, H=56, W=56, K=64, R=3, S=3, stride=1, pad=1, gflop=14.8),
    dict(name="r50_l1_1x1_up", N=64, C=64, H=56, W=56, K=256, R=1, S=1, stride=1, pad=0, gflop=6.58),
    dict(name="r50_l1_1x1_down", N=64, C=256, H=56, W=56, K=64, R=1, S=1, stride=1, pad=0, gflop=6.58),
    dict(name="r50_l2_3x3_s2", N=64, C=128, H=56, W=56, K=128, R=3, S=3, stride=2, pad=1, gflop=14.8),
    dict(name="r50_l2_3x3", N=64, C=128, H=28, W=28, K=128, R=3, S=3, stride=1, pad=1, gflop=14.8),
    dict(name="r50_l3_3x3", N=64, C=256, H=14, W=14, K=256, R=3, S=3, stride=1, pad=1, gflop=14.8),
    dict(name="r50_l4_3x3", N=64, C=512, H=7, W=7, K=512, R=3, S=3, stride=1, pad=1, gflop=14.8),
    dict(name="r50_down_1x1_s2", N=64, C=1024, H=14, W=14, K=2048, R=1, S=1, stride=2, pad=0, gflop=13.15),
    dict(name="r50_l4_1x1", N=64, C=2048, H=7, W=7, K=512, R=1, S=1, stride=1, pad=0, gflop=6.58),
    dict(name="vgg16_conv1_2", N=32, C=64, H=224, W=224, K=64, R=3, S=3, stride=1, pad=1, gflop=118.38),
    dict(name="vgg16_conv3", N=32, C=256, H=56, W=56, K=256, R=3, S=3, stride=1, pad=1, gflop=118.38),
    dict(name="vgg16_conv5", N=32, C=512, H=14, W=14, K=512, R=3, S=3, stride=1, pad=1, gflop=29.6),
]
PASSES = ("fwd", "bwd_data", "bwd_filter")
# cuDNN's settings: (name, tensor dtype, TF32 allowed, channels_last); per precision, the first
# is the like-for-like one
CUDNN = {
    "fp32": (("fp32", "float32", False, False), ("fp32_cl", "float32", False, True),
             ("tf32", "float32", True, False), ("tf32_cl", "float32", True, True)),
    "tf32": (("tf32", "float32", True, False), ("tf32_cl", "float32", True, True)),
    "bf16": (("bf16", "bfloat16", False, False), ("bf16_cl", "bfloat16", False, True)),
    "fp16": (("fp16", "float16", False, False), ("fp16_cl", "float16", False, True)),
}


def settings(args) -> tuple:
    return tuple(c for c in CUDNN[args.precision] if not (args.precision == "fp32" and c[2] and args.no_tf32))


def no_gpu(reason: str) -> None:
    print(f"gpu_conv: needs an NVIDIA GPU with CuPy and PyTorch (CUDA): {reason}", file=sys.stderr)
    sys.exit(2)


def out_size(n: int, k: int, stride: int, pad: int) -> int:
    return (n + 2 * pad - k) // stride + 1  # PyTorch's floor


def node_for(layer: dict):
    """The layer as a conv NodeInfo, as the compiler builds it (floor rounding, as PyTorch)."""
    from cnnc.backends.base import NodeInfo
    from cnnc.compiler.ops import OPS, resolve_pads

    attrs = OPS["conv"].attrs(filters=layer["K"], kernel=(layer["R"], layer["S"]), stride=layer["stride"],
                              pad=layer["pad"], bias=False, round="floor")
    shape = (layer["C"], layer["H"], layer["W"])
    out = tuple(OPS["conv"].shape(attrs, [shape]))
    pads = resolve_pads(attrs.pad, layer["H"], layer["W"], attrs.kernel, attrs.stride)
    return NodeInfo(0, layer["name"], "conv", attrs, (shape,), out, pads)


def median_ms(fn, timer, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` launches, each between two CUDA events;
    timer = (make_event, elapsed_ms(start, end))."""
    make, elapsed = timer
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = make(), make()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(elapsed(start, end))
    return statistics.median(times)


def rel_err(a, b) -> float:
    import torch
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / max(float(torch.linalg.vector_norm(b)), 1e-30))


def bench_layer(layer: dict, args, cp, torch) -> list[dict]:
    from cnnc.backends.cuda import conv

    node = node_for(layer)
    n, c, h, w, k, r, s = (layer[x] for x in ("N", "C", "H", "W", "K", "R", "S"))
    stride, pad = layer["stride"], layer["pad"]
    p, q = out_size(h, r, stride, pad), out_size(w, s, stride, pad)
    assert node.out_shape == (k, p, q), (node.out_shape, (k, p, q))
    flop = 2.0 * n * k * p * q * c * r * s

    g = torch.Generator(device="cuda").manual_seed(0)
    x_t = torch.randn(n, c, h, w, device="cuda", generator=g)
    w_t = torch.randn(k, c, r, s, device="cuda", generator=g) / math.sqrt(c * r * s)
    dy_t = torch.randn(n, k, p, q, device="cuda", generator=g)
    y_t = torch.empty(n, k, p, q, device="cuda")
    dx_t = torch.empty(n, c, h, w, device="cuda")
    dw_t = torch.empty(k, c, r, s, device="cuda")
    # CuPy views of the same memory (both libraries on the legacy default stream)
    x, wgt, dy, y, dx, dw = (cp.asarray(t) for t in (x_t, w_t, dy_t, y_t, dx_t, dw_t))

    layouts = {}
    for dtype in {c[1] for c in CUDNN[args.precision]} | {"float32"}:
        plain = tuple(t.to(getattr(torch, dtype)) for t in (x_t, w_t, dy_t))
        layouts[dtype, False] = plain
        layouts[dtype, True] = tuple(t.contiguous(memory_format=torch.channels_last) for t in plain)

    def cudnn(pass_, dtype="float32", channels_last=False):
        xx, ww, dd = layouts[dtype, channels_last]
        if pass_ == "fwd":
            return lambda: torch.nn.functional.conv2d(xx, ww, stride=stride, padding=pad)
        mask = (True, False, False) if pass_ == "bwd_data" else (False, True, False)
        idx = 0 if pass_ == "bwd_data" else 1
        return lambda: torch.ops.aten.convolution_backward(
            dd, xx, ww, None, (stride, stride), (pad, pad), (1, 1), False, (0, 0), 1, mask)[idx]

    def set_tf32(on: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    cupy_timer = (cp.cuda.Event, cp.cuda.get_elapsed_time)
    torch_timer = (lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))
    ours_arrays = {"fwd": (x, wgt, y), "bwd_data": (dy, wgt, dx), "bwd_filter": (x, dy, dw)}
    ours_out = {"fwd": y_t, "bwd_data": dx_t, "bwd_filter": dw_t}
    records = []
    peak = PEAK_TFLOPS[args.precision]
    for pass_ in PASSES:
        t0 = time.perf_counter()
        run, cfg = conv.launcher(node, pass_, ours_arrays[pass_], precision=args.precision)
        tune_s = time.perf_counter() - t0
        set_tf32(False)
        ref = cudnn(pass_)()
        run()
        torch.cuda.synchronize()
        err = rel_err(ours_out[pass_], ref)
        ours_ms = median_ms(run, cupy_timer, args.warmup, args.repeats)
        variants = {}
        for name, dtype, tf32, channels_last in settings(args):
            set_tf32(tf32)
            variants[name] = median_ms(cudnn(pass_, dtype, channels_last), torch_timer, args.warmup, args.repeats)
        set_tf32(False)
        # like for like: cuDNN in our precision, NCHW; best: its faster layout
        first, second = settings(args)[0][0], settings(args)[1][0]
        cudnn_ms, best = variants[first], min(variants[first], variants[second])
        rec = dict(layer=layer["name"], **{'pass': pass_}, precision=args.precision, gflop=flop / 1e9,
                   ours_ms=ours_ms, ours_tflops=flop / ours_ms / 1e9, ours_peak_pct=100 * flop / ours_ms / 1e9 / peak,
                   cudnn_ms=cudnn_ms, cudnn_tflops=flop / cudnn_ms / 1e9, ratio=ours_ms / cudnn_ms,
                   ratio_best=ours_ms / best, cudnn_ms_by_setting=variants,
                   cudnn_tf32_ms=variants.get("tf32"), rel_err=err, config=repr(cfg), tune_s=tune_s)
        records.append(rec)
        print(f"  {layer['name']:16s} {pass_:10s} ours {ours_ms:8.3f} ms  cuDNN "
              + " ".join(f"{k} {v:.3f}" for k, v in variants.items())
              + f" ms  ratio {rec['ratio']:5.2f}  err {err:.1e}  {cfg}", file=sys.stderr, flush=True)
    return records


def geomean(values) -> float:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def table(records: list[dict], tf32: bool) -> str:
    """The records of one precision as a table; `tf32`: float32 records carry cuDNN's TF32 columns."""
    precision = records[0].get("precision", "fp32") if records else "fp32"
    tf32 = tf32 and precision == "fp32"
    head = (f"{'layer':16s} {'pass':10s} {'GFLOP':>7s} {'ours ms':>9s} {'TFLOP/s':>8s} {'%peak':>6s} "
            f"{'cuDNN ms':>9s} {'TFLOP/s':>8s} {'CL ms':>8s} {'ours/cuDNN':>10s} {'best':>5s}"
            + (f" {'TF32 ms':>8s} {'TF32 CL':>8s}" if tf32 else "") + f" {'rel err':>8s}")
    lines = [head, "-" * len(head)]
    for r in records:
        v = r["cudnn_ms_by_setting"]
        cl = v[f"{precision}_cl"]
        lines.append(f"{r['layer']:16s} {r['pass']:10s} {r['gflop']:7.2f} {r['ours_ms']:9.3f} "
                     f"{r['ours_tflops']:8.2f} {r['ours_peak_pct']:6.1f} {r['cudnn_ms']:9.3f} "
                     f"{r['cudnn_tflops']:8.2f} {cl:8.3f} {r['ratio']:10.2f} {r['ratio_best']:5.2f}"
                     + (f" {v['tf32']:8.3f} {v['tf32_cl']:8.3f}" if tf32 else "") + f" {r['rel_err']:8.1e}")
    lines.append("-" * len(head))
    for pass_ in PASSES:
        rs = [r for r in records if r["pass"] == pass_]
        if rs:
            tf = (f"; cuDNN TF32 {geomean(r['gflop'] / min(r['cudnn_ms_by_setting']['tf32'], r['cudnn_ms_by_setting']['tf32_cl']) for r in rs):6.2f} TFLOP/s"
                  if tf32 else "")
            lines.append(f"geometric mean ours/cuDNN {precision} {pass_:10s} {geomean(r['ratio'] for r in rs):6.2f}, "
                         f"against cuDNN's better layout {geomean(r['ratio_best'] for r in rs):5.2f}   "
                         f"(ours {geomean(r['ours_tflops'] for r in rs):6.2f} TFLOP/s, "
                         f"cuDNN {geomean(r['cudnn_tflops'] for r in rs):6.2f} TFLOP/s{tf})")
    return "\n".join(lines)


def dry_run(layers, args) -> int:
    """The measurements a run makes, with each layer's shapes checked against the compiler's."""
    for layer in layers:
        node = node_for(layer)
        p = out_size(layer["H"], layer["R"], layer["stride"], layer["pad"])
        q = out_size(layer["W"], layer["S"], layer["stride"], layer["pad"])
        if node.out_shape != (layer["K"], p, q):
            print(f"gpu_conv: {layer['name']}: the compiler gives {node.out_shape}, PyTorch {(layer['K'], p, q)}",
                  file=sys.stderr)
            return 1
        flop = 2.0 * layer["N"] * layer["K"] * p * q * layer["C"] * layer["R"] * layer["S"]
        if abs(flop / 1e9 - layer["gflop"]) > 0.01 * layer["gflop"]:
            print(f"gpu_conv: {layer['name']}: {flop / 1e9:.2f} GFLOP, the table says {layer['gflop']}", file=sys.stderr)
            return 1
        names = [c[0] for c in settings(args)]
        for pass_ in PASSES:
            print(f"{layer['name']:16s} {pass_:10s} {flop / 1e9:7.2f} GFLOP  ours {args.precision} "
                  f"(autotune {args.autotune}) against cuDNN {', '.join(names)}")
    print(f"{len(layers)} layers x {len(PASSES)} passes in {args.precision}, {args.warmup} warm-up and "
          f"{args.repeats} timed launches each")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", help="comma-separated layer names (default: all 13)")
    ap.add_argument("--autotune", choices=("off", "fast", "full"), default="fast",
                    help="how our configuration is chosen (default fast: the cost model's first three, timed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-tf32", action="store_true", help="float32: skip the cuDNN TF32 columns")
    ap.add_argument("--json", metavar="PATH", help="write the records as JSON (`-`: stdout)")
    ap.add_argument("--dry-run", action="store_true", help="list the measurements and check the layer table; no GPU")
    ap.add_argument("--precision", choices=tuple(PEAK_TFLOPS), default="fp32",
                    help="what ours and cuDNN compute in (default fp32; tf32, bf16, fp16: ours on the tensor cores)")
    args = ap.parse_args(argv)
    layers = LAYERS
    if args.layers:
        wanted = args.layers.split(",")
        unknown = set(wanted) - {lay["name"] for lay in LAYERS}
        if unknown:
            ap.error(f"unknown layers: {', '.join(sorted(unknown))}")
        layers = [lay for lay in LAYERS if lay["name"] in wanted]
    if args.dry_run:
        return dry_run(layers, args)

    try:
        import torch
    except ImportError:
        no_gpu("PyTorch is not installed")
    if not torch.cuda.is_available():
        no_gpu("torch.cuda.is_available() is false")
    from cnnc.backends.cuda import conv, device, tuner
    if not device.gpu_available():
        no_gpu("CuPy is missing or sees no GPU")
    cp = device.cupy()
    tuner.MODE = args.autotune
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    name = torch.cuda.get_device_name()
    print(f"gpu_conv: {name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"CuPy {cp.__version__}, autotune {args.autotune}", file=sys.stderr)
    records = []
    for layer in layers:
        records += bench_layer(layer, args, cp, torch)
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()

    result = dict(device=name, torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                  autotune=args.autotune, precision=args.precision, peak_tflops=PEAK_TFLOPS[args.precision],
                  records=records,
                  geomean_ratio={p: geomean(r["ratio"] for r in records if r["pass"] == p) for p in PASSES})
    if args.json:
        text = json.dumps(result, indent=1)
        if args.json == "-":
            print(text)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
    ours = "float32" if args.precision == "fp32" else f"{args.precision} on the tensor cores (float32 sums)"
    print(f"\n{name}: ours {ours}, NCHW; cuDNN (cudnn.benchmark on) {args.precision} NCHW and channels_last (CL)"
          + (", and TF32 on tensor cores" if args.precision == "fp32" and not args.no_tf32 else "") + "\n"
          + table(records, not args.no_tf32))
    tol = TOLERANCE[args.precision]
    bad = [r for r in records if not r["rel_err"] <= tol]
    if bad:
        print(f"\nWRONG RESULTS (relative error > {tol:g}): "
              + ", ".join(f"{r['layer']}/{r['pass']} {r['rel_err']:.1e}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
