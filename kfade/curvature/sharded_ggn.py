"""Exact Gauss-Newton products G·v on an FSDP model (``kfade.fsdp``), v and G·v as ``DTensor`` row shards.

Per batch, J v comes from a forward-mode pass *without* autograd (``torch.no_grad``): FSDP's autograd hooks on
block inputs are custom Functions without a forward-mode rule, so a dual forward with grad enabled fails. Each
covered ``nn.Linear`` y = W a + b gets the tangent V a + v_b added to its output's tangent by a forward hook,
V and v_b all-gathered one layer at a time; the dual tangents carry it through the rest of the network. Then an
ordinary forward and ``backward`` of ⟨z, H J v⟩ lets FSDP reduce-scatter Jᵀ H J v, summed over the ranks, into
the parameters' sharded ``.grad``. That is two forwards and one backward per batch.

Not available under FSDP (ConfigError): ``ggn_mode=double_backward`` and ``cg_retain_graphs`` — they
differentiate Jᵀu with respect to the parameters, and FSDP's sharded parameters are not in the autograd graph
(its forward uses unsharded copies, freed after the backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import nn

from kfade import distributed, fsdp
from kfade.curvature.ggn import GaussNewton, Vector, _eager_attention, output_hessian_product
from kfade.errors import ConfigError


def gauss_newton(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], names: Sequence[str],
                 mode: str = "auto", retain_graphs: bool = False, progress: bool = False) -> GaussNewton:
    """The GGN operator for ``model``: ``ShardedGaussNewton`` on an FSDP model, else ``GaussNewton``."""
    kind = ShardedGaussNewton if distributed.world_size() > 1 and fsdp.is_sharded(model) else GaussNewton
    return kind(model, batches, names, mode=mode, retain_graphs=retain_graphs, progress=progress)


class ShardedGaussNewton(GaussNewton):
    """``GaussNewton`` on an FSDP model for covered ``nn.Linear`` weights and biases (module docstring). Each rank
    takes its shard of the batches, padded with zero-weight passes to the longest shard."""

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], names: Sequence[str],
                 mode: str = "auto", retain_graphs: bool = False, progress: bool = False):
        if mode == "double_backward" or retain_graphs:
            key, value = ("method.cg_retain_graphs", True) if retain_graphs else ("method.ggn_mode", mode)
            raise ConfigError(key, value, "not with distributed.strategy=fsdp: FSDP's sharded parameters are not "
                              "in the autograd graph, so Jᵀu cannot be differentiated; use ggn_mode=auto (forward)")
        super().__init__(model, batches, names, mode="forward", progress=progress)
        modules = dict(model.named_modules())
        self.layers: dict[str, tuple[str | None, str | None]] = {}  # module → (weight name, bias name) in v
        for name in self.names:
            module, _, attr = name.rpartition(".")
            if not isinstance(modules.get(module), nn.Linear) or attr not in ("weight", "bias"):
                raise ConfigError("names", name, "FSDP Gauss-Newton products cover nn.Linear weights and biases only")
            weight, bias = self.layers.get(module, (None, None))
            self.layers[module] = (name, bias) if attr == "weight" else (weight, name)
        self.modules = {name: modules[name] for name in self.layers}
        self.weights = [1.0] * len(self.batches)
        for _ in range(distributed.maximum(len(self.batches)) - len(self.batches)):
            self.batches.append(self.batches[0])
            self.masks.append(self.masks[0])
            self.weights.append(0.0)

    def matvec(self, v: Vector) -> Vector:
        """G v for ``DTensor`` shards ``v`` (the parameters' layout); returned sharded, in the compute dtype."""
        if set(v) != set(self.names):
            raise ConfigError("v", sorted(set(v) ^ set(self.names))[:3], "keys differ from the operator's parameters")
        grads = None
        with fsdp.summed_gradients(self.model), _eager_attention(self.model):
            for i in range(len(self.batches)):
                self._backward_hjv(i, v)
                grads = fsdp.take_grads(self.model, self.names, grads, self.compute_dtype)
        self.products += 1
        return {n: g / self.n_tokens for n, g in grads.items()}

    def vector(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        return fsdp.shard_like(whole, dict(self.model.named_parameters())[name])

    def _backward_hjv(self, i: int, v: Vector) -> None:
        """Batch i's Jᵀ H J v (weighted: 0 for a padding pass) into the parameters' sharded ``.grad``."""
        with torch.no_grad(), fwad.dual_level(), self._tangents(v):
            primal, tangent = fwad.unpack_dual(self.model(**self._inputs(i)).logits)
            z = primal[self.masks[i]].to(self.compute_dtype)
            jv = tangent[self.masks[i]].to(self.compute_dtype)
        hjv = output_hessian_product(z, jv) * self.weights[i]
        with torch.enable_grad():
            self.model(**self._inputs(i)).logits[self.masks[i]].to(self.compute_dtype).backward(hjv)

    @contextlib.contextmanager
    def _tangents(self, v: Vector) -> Iterator[None]:
        """Forward hooks adding V a + v_b to each covered layer's output tangent (V, v_b all-gathered)."""
        def hook(name: str):
            weight, bias = self.layers[name]

            def add_tangent(module, args, output):
                x = fwad.unpack_dual(args[0]).primal
                w = fsdp.full(v[weight]).to(x.dtype) if weight else torch.zeros_like(module.weight, dtype=x.dtype)
                extra = F.linear(x, w, fsdp.full(v[bias]).to(x.dtype) if bias else None)
                primal, tangent = fwad.unpack_dual(output)
                return fwad.make_dual(primal, extra if tangent is None else tangent + extra)

            return add_tangent

        handles = [module.register_forward_hook(hook(name)) for name, module in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
