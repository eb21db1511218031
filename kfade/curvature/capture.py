"""Forward hooks on the covered layers and one batch's activations and output gradients.

Nothing touches parameters' ``.grad``: output gradients come from ``torch.autograd.grad`` with respect to the
layers' *outputs* (no weight gradient is ever formed). Layers reading the same input tensor (q/k/v; gate/up)
are detected by tensor identity during the forward and share one activation group, computed once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from kfade import fsdp
from kfade.curvature.config import CurvatureConfig
from kfade.curvature.fisher import IGNORE_INDEX, label_positions, signals
from kfade.curvature.layers import LayerSpec
from kfade.errors import ConfigError

SIGNAL_CHUNK_ELEMENTS = 2**22  # bound on K·N·V of one batched backward (exact Fisher / several MC draws)


@dataclass
class CapturedBatch:
    """One batch after the forward: masked augmented activations per group and a generator of output grads."""

    activations: dict[str, torch.Tensor]  # group → ā (B, T, in'), zero outside ``fed``, factor dtype
    groups: dict[str, str]  # layer → its activation group
    n_tokens: int  # label tokens of the batch
    n_positions: int  # positions feeding the factors
    output_grads: Iterator[dict[str, torch.Tensor]]  # layer → g (K, B, T, out) per chunk of signals, masked


class LayerCapture:
    """Context manager: hooks on the covered ``nn.Linear`` modules while active, state restored on exit."""

    def __init__(self, model: nn.Module, layers: list[LayerSpec], factor_dtype: torch.dtype):
        self.model, self.layers, self.factor_dtype = model, layers, factor_dtype
        self.groups: dict[str, str] | None = None  # layer → activation group (first layer reading the input)
        self._recording = False
        self._inputs: dict[tuple[int, bool], tuple[str, torch.Tensor]] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._layer_group: dict[str, str] = {}
        self._sharded = fsdp.is_sharded(model)  # one backward per signal: as many on every rank (FSDP)

    def __enter__(self) -> LayerCapture:
        modules = dict(self.model.named_modules())
        self._handles = [modules[spec.name].register_forward_hook(self._hook(spec)) for spec in self.layers]
        weights = [modules[spec.name].weight for spec in self.layers]
        self._requires_grad = [(w, w.requires_grad) for w in weights]
        for w in weights:
            w.requires_grad_(True)  # layer outputs must be in the graph; .grad is never written
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for w, flag in self._requires_grad:
            w.requires_grad_(flag)
        self._clear()

    def _hook(self, spec: LayerSpec):
        def hook(module, args, output):
            if not self._recording:  # e.g. the recomputation of a checkpointed block during backward
                return
            if spec.name in self._outputs:
                raise ConfigError("curvature.modules", spec.name, "module runs twice per forward (shared weights)")
            if not output.requires_grad:
                raise ConfigError("model", spec.name, "layer output is not differentiable: fit outside "
                                  "torch.no_grad, and use gradient checkpointing with use_reentrant=False")
            x = args[0]
            key = (id(x), spec.bias is not None)
            if key not in self._inputs:  # holding x keeps its id unique for the rest of the forward
                self._inputs[key] = (spec.name, x)
            self._layer_group[spec.name] = self._inputs[key][0]
            self._outputs[spec.name] = output

        return hook

    def _clear(self) -> None:
        self._inputs, self._outputs, self._layer_group = {}, {}, {}

    def capture(self, batch: dict[str, torch.Tensor], cfg: CurvatureConfig, generator: torch.Generator,
                active: set[str] | None = None) -> CapturedBatch:
        """Run the forward on ``batch``; the returned grads generator runs the backward(s) lazily. Only the
        ``active`` layers (default: all) get activations and output gradients (a layer group of the fit)."""
        self._clear()
        targets, fed = label_positions(batch)
        is_label = targets != IGNORE_INDEX
        n_tokens = int(is_label.sum())
        if n_tokens == 0:
            raise ConfigError("batch", "labels", "no label tokens (all labels are -100 or padding)")
        self._recording = True
        try:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                use_cache=False).logits
        finally:
            self._recording = False
        if self.groups is None:
            self.groups = dict(self._layer_group)
        elif self.groups != self._layer_group:
            raise RuntimeError("layers read different shared inputs from one batch to the next")
        bias_of = {spec.name: spec.bias is not None for spec in self.layers}
        specs = [spec for spec in self.layers if active is None or spec.name in active]
        needed = {self.groups[spec.name] for spec in specs}
        fed_f = fed.unsqueeze(-1).to(self.factor_dtype)
        activations = {}
        for group, x in self._inputs.values():
            if group not in needed:
                continue
            a = x.detach().to(self.factor_dtype)
            if bias_of[group]:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            activations[group] = a * fed_f
        z = logits[is_label].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64) label logits
        rank = (is_label.cumsum(1) - 1)[is_label]
        probs = torch.softmax(z.detach(), dim=-1)
        sig = signals(probs, targets[is_label], rank, cfg.fisher, cfg.mc_samples, generator)
        outputs = [self._outputs[spec.name] for spec in specs]
        self._inputs, self._outputs = {}, {}
        return CapturedBatch(activations, self.groups, n_tokens, int(fed.sum()),
                             self._output_grads(z, sig, specs, outputs, fed_f))

    def _output_grads(self, z, sig, specs, outputs, fed_f) -> Iterator[dict[str, torch.Tensor]]:
        chunk = 1 if self._sharded else max(1, SIGNAL_CHUNK_ELEMENTS // max(1, sig[0].numel()))
        for start in range(0, len(sig), chunk):
            part = sig[start : start + chunk]
            last = start + chunk >= len(sig)
            with warnings.catch_warnings():  # vmap falls back to a loop for ops without a batching rule
                warnings.filterwarnings("ignore", message="There is a performance drop")
                grads = torch.autograd.grad(z, outputs, part if len(part) > 1 else part[0],
                                            retain_graph=not last, allow_unused=True, materialize_grads=True,
                                            is_grads_batched=len(part) > 1)
            yield {spec.name: (g if len(part) > 1 else g.unsqueeze(0)).to(self.factor_dtype).mul_(fed_f)
                   for spec, g in zip(specs, grads, strict=True)}  # fresh tensors: masked in place
