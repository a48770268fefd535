"""Timing harnesses: tooling, not library. ``tools/benchmark.py``, ``tools/budget.py`` and ``tools/gpu_check.py``
run them, and the tests check them; nothing else in detkit may import this package (tests/benchmarks/test_benchmark.py
holds that rule), so the library never depends on its own measurements.

- ``torchvision_pair``: detkit's Faster R-CNN and torchvision's built around the same modules and weights,
  and how closely they agree; ``torchvision_parity``: the two timed against each other in one process
  (``tools/benchmark.py faster_rcnn``).
- ``pipeline``: the lineage's timing table, R-CNN to Faster R-CNN (``tools/benchmark.py pipelines``).
- ``pretrain``: ``detkit pretrain`` against the PyTorch ImageNet example's loop (``tools/benchmark.py pretrain``).
- ``export``: an exported detector against the eager one (``tools/benchmark.py export``).
- ``budget``: detkit and torchvision trained for the same wall-clock budget (``tools/budget.py``).
- ``common``: what they all measure with (device sync, stopwatch, ABBA interleaving and medians, peak memory,
  the machine's description, the markdown table writer).
"""
