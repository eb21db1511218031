"""Memory plans: what a run holds where (bytes per covered layer, per phase, per device), and the factor
placement (offload, layer groups) that fits given budgets. Pure arithmetic on layer shapes; the model's shapes
come from its config alone (a meta-device model, ``architecture``), so planning needs no weights and no data."""

from kfade.plan.architecture import Architecture, architecture, load_model_config
from kfade.plan.config import OFFLOADS, MemoryConfig, Placement
from kfade.plan.memory import GB, Item, MemoryPlan, Workload, factor_totals, layer_rows, plan_memory
from kfade.plan.placement import resolve_placement

__all__ = ["GB", "OFFLOADS", "Architecture", "Item", "MemoryConfig", "MemoryPlan", "Placement", "Workload",
           "architecture", "factor_totals", "layer_rows", "load_model_config", "plan_memory", "resolve_placement"]
