"""Exact Gauss-Newton-vector products G·v, matrix-free, in Ĝ's normalisation (see ``kfade.curvature``).

    G v = (1/N_tok) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t v

over the label tokens t of a list of batches (labels ≠ −100 after the causal shift, padding excluded), J_t the
Jacobian of position t's logits with respect to the covered parameters, p_t its softmax. Units: v in parameter
units, G·v in nats per token per parameter unit, so ½vᵀGv ≈ mean per-token KL(p_θ ‖ p_θ+v).

Each product is one pass over the batches, one batch in memory at a time (chunked), in one of two modes (under
torch.distributed each rank takes its shard ``batches[rank::world]`` and the sums are all-reduced):

- ``forward``: a forward pass with the parameters as forward-mode dual numbers gives the logits and J v at once;
  one backward of H·(J v) gives Jᵀ H J v.
- ``double_backward``: J v = ∂/∂u ⟨Jᵀu, v⟩ (the backward of a backward), then one backward. With
  ``retain_graphs`` the graphs of the forward and of Jᵀu are built once and reused by every product (fastest,
  but memory grows with the number of batches).

Neither forward-mode AD nor double backward is implemented for fused SDPA attention on every device, so an
SDPA (or flash) model runs its products with eager attention (same function; switched back after each pass).

H = diag(p) − ppᵀ is applied in fp32 (fp64 for a fp64 model) on logits upcast to that dtype; results are
accumulated in that dtype and returned in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwad
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from kfade import distributed
from kfade.curvature.cg import dot
from kfade.curvature.fisher import IGNORE_INDEX, label_positions
from kfade.errors import ConfigError
from kfade.models.checkpointing import checkpointing_active
from kfade.models.params import requires_grad_only

MODES = ("auto", "forward", "double_backward")
Vector = dict[str, torch.Tensor]


def output_hessian_product(logits: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(diag p − ppᵀ) v per row, p = softmax(logits): the Hessian of the token NLL in logit space times v."""
    p = torch.softmax(logits, dim=-1)
    return p * (v - (p * v).sum(-1, keepdim=True))


@dataclass
class _Graph:
    """One batch's retained graphs: label logits z, the dummy cotangent u and Jᵀu (with its graph)."""

    z: torch.Tensor
    u: torch.Tensor
    jtu: tuple[torch.Tensor, ...]


class GaussNewton:
    """The exact GGN of the mean per-token loss over ``batches`` for the parameters ``names`` (a linear operator).

    ``model`` must not change while the operator is used (it reads the current weights at each product;
    with ``retain_graphs`` the weights of construction time are baked into the retained graphs).
    ``products`` counts the products taken.
    """

    def __init__(self, model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], names: Sequence[str],
                 mode: str = "auto", retain_graphs: bool = False, progress: bool = False):
        if mode not in MODES:
            raise ConfigError("method.ggn_mode", mode, f"must be one of {', '.join(MODES)}")
        if not batches:
            raise ConfigError("batches", "[]", "no batches for Gauss-Newton products")
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ConfigError("names", missing[:3], "not parameters of the model")
        self.model, self.names, self.progress = model, list(names), progress
        self.device = next(model.parameters()).device
        self.batches = [{k: t.to(self.device) for k, t in b.items() if isinstance(t, torch.Tensor)}
                        for b in distributed.shard(batches)]
        self.masks = [label_positions(b)[0] != IGNORE_INDEX for b in self.batches]
        n_tokens = torch.tensor([sum(int(m.sum()) for m in self.masks)], dtype=torch.float64, device=self.device)
        distributed.all_reduce_([n_tokens])
        self.n_tokens = int(n_tokens)
        if self.n_tokens == 0:
            raise ConfigError("batches", "labels", "no label tokens (all labels are -100 or padding)")
        self.compute_dtype = torch.promote_types(params[self.names[0]].dtype, torch.float32)
        if mode == "auto":
            mode = "double_backward"  # faster than forward mode on the mini-TOFU model (docs/performance.md)
        if retain_graphs and mode != "double_backward":
            raise ConfigError("method.ggn_mode", mode, "retained graphs need mode double_backward")
        if mode == "forward" and checkpointing_active(model):
            raise ConfigError("method.ggn_mode", mode, "forward-mode products do not run through gradient "
                              "checkpointing (model.gradient_checkpointing); use double_backward or auto")
        self.mode, self.retain_graphs = mode, retain_graphs
        self.products = 0
        self._graphs: list[_Graph] = []  # built by the first product when retain_graphs

    def __call__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def matvec(self, v: Vector) -> Vector:
        """G v for ``v`` = {name: tensor shaped like the parameter}; returned in the compute dtype."""
        if set(v) != set(self.names):
            raise ConfigError("v", sorted(set(v) ^ set(self.names))[:3], "keys differ from the operator's parameters")
        out = {n: torch.zeros_like(v[n], dtype=self.compute_dtype, device=self.device) for n in self.names}
        batches = tqdm(range(len(self.batches)), desc="GGN product", leave=False, disable=not self.progress)
        with torch.enable_grad():
            for i in batches:
                for acc, g in zip(out.values(), self._batch_product(i, v), strict=True):
                    acc.add_(g)
        distributed.all_reduce_(list(out.values()))
        self.products += 1
        return {n: t / self.n_tokens for n, t in out.items()}

    def mean_eigenvalue(self, probes: int = 4, seed: int = 0) -> float:
        """tr(G) / (number of parameters) by Hutchinson's estimator: the mean of zᵀGz over ``probes`` Rademacher
        vectors z, divided by their length (``probes`` products)."""
        params = dict(self.model.named_parameters())
        generator = torch.Generator().manual_seed(seed)
        size = sum(params[n].numel() for n in self.names)
        total = 0.0
        for _ in range(probes):
            signs = {n: torch.randint(0, 2, params[n].shape, generator=generator) * 2 - 1 for n in self.names}
            z = {n: self.vector(n, t.to(self.device, self.compute_dtype)) for n, t in signs.items()}
            total += dot(self.matvec(z), z)
        return total / probes / size

    def vector(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """A whole tensor shaped like parameter ``name`` as a vector this operator takes (here: itself)."""
        return whole

    def _batch_product(self, i: int, v: Vector) -> tuple[torch.Tensor, ...]:
        """Σ_t over batch i of J_tᵀ H_t J_t v (unnormalised)."""
        with requires_grad_only(self.model, self.names) as covered, _eager_attention(self.model):
            tangents = [v[n].to(device=self.device, dtype=p.dtype) for n, p in zip(self.names, covered, strict=True)]
            if self.mode == "forward":
                with fwad.dual_level():
                    duals = {n: fwad.make_dual(p, t) for n, p, t in zip(self.names, covered, tangents, strict=True)}
                    primal, tangent = fwad.unpack_dual(functional_call(self.model, duals, (), self._inputs(i)).logits)
                    z = primal[self.masks[i]].to(self.compute_dtype)
                    jv = tangent[self.masks[i]].to(self.compute_dtype)
                return self._backward(z, output_hessian_product(z.detach(), jv), covered, False)
            graph = self._graph(i, covered)
            (jv,) = torch.autograd.grad(graph.jtu, graph.u, tangents, retain_graph=self.retain_graphs)
            hjv = output_hessian_product(graph.z.detach(), jv.detach())
            return self._backward(graph.z, hjv, covered, self.retain_graphs)

    def _graph(self, i: int, covered: list[nn.Parameter]) -> _Graph:
        """Batch i's label logits z and Jᵀu with its graph (built once and kept when ``retain_graphs``)."""
        if i < len(self._graphs):
            return self._graphs[i]
        z = self.model(**self._inputs(i)).logits[self.masks[i]].to(self.compute_dtype)
        u = torch.zeros_like(z, requires_grad=True)
        graph = _Graph(z, u, torch.autograd.grad(z, covered, u, create_graph=True))
        if self.retain_graphs:
            self._graphs.append(graph)
        return graph

    @staticmethod
    def _backward(z: torch.Tensor, cotangent: torch.Tensor, params: list[torch.Tensor],
                  retain: bool) -> tuple[torch.Tensor, ...]:
        grads = torch.autograd.grad(z, params, cotangent, retain_graph=retain, allow_unused=True,
                                    materialize_grads=True)
        return tuple(g.detach() for g in grads)

    def _inputs(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.batches[i]
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model with eager attention inside the block (forward-mode AD of SDPA is not
    implemented on every device); restores the model's implementation after."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(current)
