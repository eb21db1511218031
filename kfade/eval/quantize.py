"""Weight-only quantization attack (arXiv 2410.16454): does rounding the weights bring forgotten knowledge back?

A deep copy of the model gets the weight of every ``nn.Linear`` except the output head (which GPTQ, AWQ and
bitsandbytes' loaders leave in full precision too) quantized by bitsandbytes and stored dequantized — the numbers
a weight-only kernel multiplies with; activations stay in floating point:

- 8-bit: ``int8_vectorwise_quant`` (LLM.int8's weight format): per output row, W ≈ round(127 W / absmax) · absmax/127;
- 4-bit: ``quantize_4bit`` (QLoRA's ``load_in_4bit``): blocks of ``blocksize`` consecutive weights, each scaled by
  its absmax and rounded to the nearest of 16 levels (``nf4``: normal-float quantiles; ``fp4``).

bitsandbytes rather than torchao: its quantizers run on CPU as on GPU and it is imported only here, while
``transformers`` imports an installed torchao with every model (torchao 0.18 then logs failed CUDA-extension loads
on a CPU machine, breaking the one-line stderr of a bad-config run), and torchao's int4 weight-only config has no
CPU kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kfade import fsdp
from kfade.errors import ConfigError, require_one_of

BITS = (8, 4)
QUANT_TYPES = ("nf4", "fp4")


@dataclass
class QuantizeConfig:
    """``eval.quantize``: which widths, and the 4-bit format."""

    bits: list[int] = field(default_factory=lambda: [8, 4])  # each gives quant<bits>/… keys
    quant_type: str = "nf4"  # 4-bit levels: nf4 | fp4
    blocksize: int = 64  # 4-bit: consecutive weights sharing one absmax scale (bitsandbytes' default)

    def validate(self) -> None:
        for bits in self.bits:
            if bits not in BITS or self.bits.count(bits) > 1:
                raise ConfigError("eval.quantize.bits", bits, f"choose distinct widths from {list(BITS)}")
        require_one_of("eval.quantize.quant_type", self.quant_type, QUANT_TYPES)
        require_one_of("eval.quantize.blocksize", self.blocksize, (64, 128, 256, 512, 1024, 2048, 4096))


def _functional():
    """``bitsandbytes.functional``, imported on first use (its note about an optional CPU gemm kernel silenced)."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_functional
    finally:
        log.setLevel(level)
    return bnb_functional


def quantize_weight(weight: torch.Tensor, bits: int, quant_type: str = "nf4", blocksize: int = 64) -> torch.Tensor:
    """``weight`` rounded by bitsandbytes to ``bits`` bits and dequantized, in its own dtype."""
    bnb = _functional()
    if bits == 8:
        codes, row_absmax, _ = bnb.int8_vectorwise_quant(weight.float())
        return bnb.int8_vectorwise_dequant(codes, row_absmax).to(weight.dtype)
    packed, state = bnb.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    return bnb.dequantize_4bit(packed, state).to(weight.dtype)


@torch.no_grad()
def quantized(model: torch.nn.Module, bits: int, quant_type: str = "nf4", blocksize: int = 64) -> torch.nn.Module:
    """A copy of ``model`` whose linear weights (output head excepted) are ``bits``-bit quantized (FSDP: each
    weight gathered whole in turn, quantized, and this rank's rows kept)."""
    copied = fsdp.copy_model(model)
    head = copied.get_output_embeddings()
    for module in copied.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            fsdp.assign(module.weight, quantize_weight(fsdp.full(module.weight), bits, quant_type, blocksize))
    return copied
