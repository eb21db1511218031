"""Which rank owns (fits, stores, preconditions with) each layer's factors under ``distributed.strategy=fsdp``.

The unit of ownership is an activation group (the layers reading one input, e.g. q/k/v or gate/up, whose shared
A is stored once): its A and its layers' S and eigenvalues stay together. Units are assigned greedily, largest
first, to the rank holding the fewest bytes so far (ties: the lower rank, then the earlier unit), so each rank
stores about 1/world of the factor bytes; the assignment depends only on the layer shapes and the world size.
"""

from __future__ import annotations

from kfade.curvature.estimators import estimator as estimator_named
from kfade.curvature.layers import LayerSpec


def assign_owners(layers: list[LayerSpec], groups: dict[str, str], estimator: str, world: int) -> dict[str, int]:
    """layer name → owning rank in ``range(world)``, balanced by stored bytes (module docstring)."""
    units: dict[str, int] = {}
    stored = estimator_named(estimator).stored_elements
    for spec in layers:
        group = groups.get(spec.name, spec.name)
        units[group] = units.get(group, 0) + sum(stored(spec, group == spec.name).values())
    load, owner_of = [0] * world, {}
    for group, size in sorted(units.items(), key=lambda kv: -kv[1]):  # stable: earlier units first on ties
        rank = min(range(world), key=lambda r: (load[r], r))
        owner_of[group] = rank
        load[rank] += size
    return {spec.name: owner_of[groups.get(spec.name, spec.name)] for spec in layers}
