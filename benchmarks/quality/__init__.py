"""Shared code of the quality benchmark (``benchmarks/quality_small.py``) and the scripts that read its outputs
(``reference_probe.py``, ``quality_small_table.py``, ``make_readme.py``).

- :mod:`~benchmarks.quality.settings`: the recipe (``recipes/configs/quality_small.yaml``), read strictly;
- :mod:`~benchmarks.quality.variants`: variants as typed diffs over one base configuration;
- :mod:`~benchmarks.quality.names`: earlier variant names, mapped to the current ones;
- :mod:`~benchmarks.quality.data`: source media, training plans, held-out clips, rendering;
- :mod:`~benchmarks.quality.media`: OpenCV's sample footage and photographs, downloaded once;
- :mod:`~benchmarks.quality.evaluation`: metrics by distance from the reference frame, gains, targets.
"""
