"""Image DiT benchmark: training and sampling throughput, peak memory, analytic MACs, MFU.

What is timed
-------------
- **training**: one full optimisation step per iteration on a fixed synthetic batch of
  latents and labels already on the device (no data loading): the rectified-flow loss
  (``RectifiedFlow.loss``: noise, time, interpolant, forward, MSE), ``backward``, an AdamW
  step (``fused=True`` on CUDA) and ``zero_grad(set_to_none=True)``. With
  ``precision="bf16"`` the forward and loss run under ``torch.autocast(dtype=bfloat16)``
  (weights and optimiser state stay fp32: mixed precision); with ``compile=True`` the model
  is wrapped by ``torch.compile``.
- **sampling**: one forward pass per step (one Euler step of the flow ODE) in eval mode,
  ``torch.no_grad``, classifier-free guidance off (batch = ``batch_size``), same precision
  and compile settings. ``sample.images_per_s`` counts image-forwards per second; a
  K-step sample costs K of them.

Each phase runs ``warmup`` untimed iterations first (at least one: with ``compile`` the
warm-up is where compilation happens), then ``steps`` timed iterations between two
``torch.cuda.synchronize()`` calls on CUDA.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(called after warm-up, so it covers the timed steps: weights, gradients, optimiser state,
activations); on CPU the process's peak resident set size (``resource.getrusage``), which
cannot be reset and so covers the whole process up to that point.

Throughput in FLOP/s uses the analytic count of :mod:`celldit.models.flops`: a training
image costs ``3 * 2 * forward MACs`` FLOPs and a sampling forward ``2 * forward MACs``.
MFU = achieved TFLOP/s / the device's peak dense TFLOP/s for the precision used (table
:data:`PEAK_TFLOPS`, or ``peak_tflops`` given by the caller).

TF32: on CUDA, fp32 matmuls run in true fp32 unless ``tf32=True``, which enables TF32
tensor cores (``torch.backends.cuda.matmul.allow_tf32`` and cuDNN's) for that run only and
switches the MFU peak to the TF32 one. bf16 runs are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import time
from typing import Any

import torch

from ..flow import RectifiedFlow
from ..models import ImageDiT
from ..models.flops import VAE_DOWNSAMPLE, dit_forward_macs, preset_config

PRECISIONS = ("bf16", "fp32")

#: peak dense (no sparsity) tensor TFLOP/s by GPU: (name substring, bf16, tf32, fp32 non-tensor).
#: From NVIDIA's data sheets; the first matching substring wins, so specific names come first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
]


def peak_tflops_for(device_name: str, precision: str, tf32: bool = False) -> tuple[float | None, str | None]:
    """Peak dense TFLOP/s of ``device_name`` for ``precision`` ("bf16" or "fp32"; fp32 with
    ``tf32`` uses the TF32 tensor-core peak), and the table row it came from; ``(None,
    None)`` for an unknown device (CPUs included)."""
    kind = "bf16" if precision == "bf16" else ("tf32" if tf32 else "fp32")
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[kind], f"table: {key} {kind} dense"
    return None, None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Torch version, device name, CPU count and related facts, JSON-serialisable."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(), gpu_memory_gib=round(props.total_memory / 2**30, 2),
            gpu_count=torch.cuda.device_count(),
        )  # fmt: skip
    else:
        info["device_name"] = info["cpu"]
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda_max_memory_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB
        kind = "cpu_max_rss_process"
    return {"peak_memory_bytes": int(peak), "peak_memory_gib": round(peak / 2**30, 3), "peak_memory_kind": kind}


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _tf32(enabled: bool):
    """Enable TF32 matmuls/convolutions for the block only (CUDA; harmless on CPU)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _time_training(
    model: ImageDiT, x1: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, precision: str,
    compile: bool, compile_mode: str | None, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    flow = RectifiedFlow(time_scale=1000.0)
    model.train()
    net = torch.compile(model, mode=compile_mode) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def step() -> torch.Tensor:
        with _autocast(device, precision):
            loss = flow.loss(net, x1, y=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(max(warmup, 1)):
        step()
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {"seconds": elapsed, "step_time_s": elapsed / steps, "loss": float(loss)}
    out.update(_peak_memory(device))
    return out


@torch.no_grad()
def _time_sampling(
    model: ImageDiT, x0: torch.Tensor, y: torch.Tensor, steps: int, warmup: int, precision: str,
    compile: bool, compile_mode: str | None, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    model.eval()
    net = torch.compile(model, mode=compile_mode) if compile else model
    c = x0.shape[1]
    dt = 1.0 / steps

    def step(x: torch.Tensor, t: float) -> torch.Tensor:  # one Euler step, CFG off
        tt = torch.full((x.shape[0],), t * 1000.0, device=device)
        with _autocast(device, precision):
            v = net(x, tt, y)
        return x + dt * v[:, :c].float()

    x = x0.clone()
    for _ in range(max(warmup, 1)):
        step(x0, 0.0)
    _sync(device)
    _reset_peak(device)
    t0 = time.perf_counter()
    for i in range(steps):
        x = step(x, i * dt)
    _sync(device)
    elapsed = time.perf_counter() - t0
    out = {"seconds": elapsed, "step_time_s": elapsed / steps, "finite": bool(torch.isfinite(x).all())}
    out.update(_peak_memory(device))
    return out


def _rates(images: int, seconds: float, flops_per_image: float, peak: float | None) -> dict[str, Any]:
    ips = images / seconds
    tflops = ips * flops_per_image / 1e12
    return {
        "images_per_s": ips,
        "achieved_tflops": tflops,
        "mfu": (tflops / peak) if peak else None,
    }


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU -> ValueError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available (torch "
                         f"{torch.__version__}); use --device cpu")  # fmt: skip
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def bench_image(
    preset: str = "DiT-XL/2",
    image_size: int = 256,
    batch_size: int = 32,
    steps: int = 20,
    warmup: int = 3,
    device: str | torch.device | None = None,
    compile: bool = False,
    precision: str | None = None,
    peak_tflops: float | None = None,
    reference: bool = False,
    tf32: bool = False,
    compile_mode: str | None = None,
    gradient_checkpointing: bool = False,
    num_classes: int = 1000,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Benchmark an image DiT preset; returns one JSON-serialisable dict.

    Parameters
    ----------
    preset
        ``"DiT-{S,B,L,XL}/{2,4,8}"``.
    image_size
        Image side in pixels; the model sees ``image_size / 8`` latents with 4 channels
        (256 px -> 32x32x4, the paper's setting).
    batch_size, steps, warmup
        Images per step, timed steps and untimed warm-up steps (per phase).
    device
        ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available).
    compile
        Wrap the model in ``torch.compile`` (``compile_mode`` passed as ``mode``).
    precision
        ``"bf16"`` (autocast, fp32 master weights) or ``"fp32"``; default bf16 on CUDA,
        fp32 on CPU.
    peak_tflops
        The device's peak TFLOP/s for this precision; overrides :data:`PEAK_TFLOPS`.
    reference
        Also time an fp32, uncompiled training step (same batch, TF32 as ``tf32``) and
        report the speed-up of the configured step over it.
    tf32
        Allow TF32 tensor cores for fp32 matmuls on CUDA (off by default: true fp32).
    gradient_checkpointing
        Recompute block activations in the backward pass (less memory, ~1.3x compute).
    num_classes, seed
        Label range of the synthetic batch and the random seed.
    threads
        ``torch.set_num_threads`` for the run (CPU intra-op threads; restored afterwards).
        On a shared, oversubscribed CPU, fewer threads than cores avoids OpenMP spin-wait
        stalls that can make small ops take a scheduler time slice each.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return bench_image(
                preset=preset, image_size=image_size, batch_size=batch_size, steps=steps, warmup=warmup,
                device=device, compile=compile, precision=precision, peak_tflops=peak_tflops,
                reference=reference, tf32=tf32, compile_mode=compile_mode,
                gradient_checkpointing=gradient_checkpointing, num_classes=num_classes, seed=seed,
            )  # fmt: skip
        finally:
            torch.set_num_threads(old_threads)
    if precision is None:
        precision = "bf16" if resolve_device(device).type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    for name, value, low in (("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if int(value) < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    config = preset_config(preset, image_size)  # validates preset and image_size
    dev = resolve_device(device)
    torch.manual_seed(seed)

    with dev:  # initialise on the device (fast for big presets on a GPU)
        model = ImageDiT(**config, num_classes=num_classes, gradient_checkpointing=gradient_checkpointing)
    macs = dit_forward_macs(**model.config)
    n_params = sum(p.numel() for p in model.parameters())
    latent = (config["in_channels"], config["input_size"], config["input_size"])
    gen = torch.Generator(device=dev).manual_seed(seed)
    x1 = torch.randn((batch_size, *latent), device=dev, generator=gen)
    y = torch.randint(0, num_classes, (batch_size,), device=dev, generator=gen)
    x0 = torch.randn((batch_size, *latent), device=dev, generator=gen)

    info = machine_info(dev)
    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
        peak, peak_source = float(peak_tflops), "given (--peak-tflops)"
    elif dev.type == "cuda":
        peak, peak_source = peak_tflops_for(info["device_name"], precision, tf32)
    else:
        peak, peak_source = None, None

    with _tf32(tf32 and dev.type == "cuda"):
        train = _time_training(model, x1, y, steps, warmup, precision, compile, compile_mode, dev)
        train.update(_rates(batch_size * steps, train["seconds"], macs.training_flops, peak))
        sample = _time_sampling(model, x0, y, steps, warmup, precision, compile, compile_mode, dev)
        sample.update(_rates(batch_size * steps, sample["seconds"], macs.forward_flops, peak))
        ref = None
        if reference:
            ref_peak = peak_tflops_for(info["device_name"], "fp32", tf32)[0] if dev.type == "cuda" else None
            ref = _time_training(model, x1, y, steps, warmup, "fp32", False, None, dev)
            ref.update(_rates(batch_size * steps, ref["seconds"], macs.training_flops, ref_peak))
            ref["speedup"] = train["images_per_s"] / ref["images_per_s"]
            ref["what"] = "fp32, no compile, same batch; speedup = train.images_per_s / this"

    return {
        "benchmark": "image",
        "config": {
            "preset": preset, "image_size": image_size, "latent_shape": list(latent),
            "batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(dev),
            "precision": precision, "compile": compile, "compile_mode": compile_mode, "tf32": tf32,
            "gradient_checkpointing": gradient_checkpointing, "num_classes": num_classes, "seed": seed,
            "optimizer": "AdamW(lr=1e-4, fused on CUDA)", "loss": "rectified flow (uniform t)",
            "cfg": False,
        },
        "machine": info,
        "model": {
            "parameters": n_params,
            "forward_macs_per_image": macs.total,
            "forward_gmacs_per_image": macs.gmacs,
            "forward_flops_per_image": macs.forward_flops,
            "training_flops_per_image": macs.training_flops,
            "macs_terms": macs.terms,
        },
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "train": train,
        "sample": sample,
        "reference": ref,
    }  # fmt: skip


__all__ = ["PEAK_TFLOPS", "PRECISIONS", "VAE_DOWNSAMPLE", "bench_image", "machine_info", "peak_tflops_for", "resolve_device"]
