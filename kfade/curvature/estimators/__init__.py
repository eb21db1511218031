"""The curvature estimators Ĝ, one class per module, registered by name (``curvature.estimator``).

Every module of this package is imported here, and each registers its class with ``@register``: a new estimator is
one new file (plus its ``conf/curvature/<name>.yaml``). ``estimator(name)`` returns the registered instance.
"""

from __future__ import annotations

import importlib
import pkgutil

from kfade.curvature.estimators.base import ESTIMATORS, Estimator, estimator, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ESTIMATORS", "Estimator", "estimator", "register"]
