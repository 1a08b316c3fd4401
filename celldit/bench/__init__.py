"""Benchmarks, importable (the ``celldit bench`` CLI and ``benchmarks/`` scripts call these).

- :func:`bench_image`: training and sampling throughput, memory and MFU of an image DiT.
"""

from .image import PEAK_TFLOPS, bench_image, machine_info, peak_tflops_for

__all__ = ["PEAK_TFLOPS", "bench_image", "machine_info", "peak_tflops_for"]
