"""Unlearning methods (K-FADE and first-order baselines) behind one interface, and unlearning deltas.

``build_method(name, cfg).run(model, UnlearnData(forget=..., retain=...), log=...)`` updates ``model``
in place and returns its per-step (K-FADE) or per-epoch (baselines) history.
"""

from kfade.unlearn.base import Method, UnlearnData
from kfade.unlearn.delta import apply_delta, compute_delta, load_delta, save_delta
from kfade.unlearn.registry import METHODS, build_method, method_classes

__all__ = ["METHODS", "Method", "UnlearnData", "apply_delta", "build_method", "compute_delta", "load_delta",
           "method_classes", "save_delta"]
