"""Benchmarks, importable (the ``celldit bench`` CLI and ``benchmarks/`` scripts call these).

- :func:`bench_image`: training and sampling throughput, memory and MFU of an image DiT.
- :func:`emit_report`: a benchmark's JSON result printed and written to its ``--out`` file.
- :mod:`~celldit.bench.cell_scoring`: how ``benchmarks/cells.py`` scores a cell model beyond
  :func:`celldit.eval.report.evaluate` (the weak-perturbation rule, support rules side by side,
  the pooled and same-footing references).
- :mod:`~celldit.bench.papalexi`: the Papalexi screen split by replicate, as the scripts score it.
"""

from .image import PEAK_TFLOPS, bench_image, machine_info, peak_tflops_for
from .report import emit_report

__all__ = ["PEAK_TFLOPS", "bench_image", "emit_report", "machine_info", "peak_tflops_for"]
