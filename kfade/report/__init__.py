"""Sweep-level reporting: a sweep's results as tables (``report``), its variants at matched forget P̄
(``matched``), regimes side by side (``regimes``), the paper tables (``paper_table``), the Pareto plots
(``plots``) and the scalar a hyperparameter sweeper minimises (``objective``). Per-model metrics: ``kfade.eval``.
"""
