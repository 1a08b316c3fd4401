"""Benchmarks, importable (the ``celldit bench`` CLI and ``benchmarks/`` scripts call these).

- :func:`bench_image`: training and sampling throughput, memory and MFU of an image DiT.
- :func:`emit_report`: a benchmark's JSON result printed and written to its ``--out`` file.
"""

from .image import PEAK_TFLOPS, bench_image, machine_info, peak_tflops_for
from .report import emit_report

__all__ = ["PEAK_TFLOPS", "bench_image", "emit_report", "machine_info", "peak_tflops_for"]
