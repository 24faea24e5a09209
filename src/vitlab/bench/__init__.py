"""Speed: FLOP counting, the benchmark against timm, and model-FLOP utilisation (see ``docs/speed.md``).

Only :mod:`vitlab.bench.flops` is imported eagerly; the benchmark pulls in timm/onnxruntime on use.
"""

from vitlab.bench.flops import count_flops, flops_breakdown, measure_flops

__all__ = ["count_flops", "flops_breakdown", "measure_flops"]
