"""Load a causal LM and its tokenizer by Hub id or local path, in a given dtype, on a given device."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfade.errors import ConfigError
from kfade.models.checkpointing import enable_gradient_checkpointing

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_dtype(name: str, key: str = "model.dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(key, name, f"unknown dtype; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str, dtype: str, key: str = "model.device") -> tuple[str, str, list[str]]:
    """``(device, dtype, notices)`` for a model config's device and dtype.

    ``auto``: ``cuda`` when CUDA is available, else ``cpu`` with a notice, where a 16-bit dtype falls back to
    float32 (also with a notice: CPU matmuls in bf16/fp16 are slow and lossy). An explicit ``cuda``/``cuda:N``
    or ``mps`` the machine does not have, or an unknown device, raises ``ConfigError``.
    """
    resolve_dtype(dtype)
    notices = []
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda", dtype, notices
        notices.append(f"{key}=auto: no CUDA device here, running on cpu")
        if resolve_dtype(dtype).itemsize == 2:
            notices.append(f"model.dtype={dtype}: on cpu using float32 instead")
            dtype = "float32"
        return "cpu", dtype, notices
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", device)
    if match is None or (match[1] != "cuda" and match[2] is not None):
        raise ConfigError(key, device, "unknown device; use auto, cpu, cuda, cuda:N or mps")
    if match[1] == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(key, device, "this machine has no CUDA device; use auto or cpu")
        if match[2] is not None and int(match[2]) >= count:
            raise ConfigError(key, device, f"this machine has {count} CUDA device(s)")
    if match[1] == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(key, device, "this machine has no MPS device; use auto or cpu")
    return device, dtype, notices


def check_source(path: str, key: str = "model.path") -> None:
    """A local path must exist and hold a config; anything else must look like a Hub id (``org/name``)."""
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ConfigError(key, path, "directory has no config.json (not a saved Hugging Face model)")
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if not any((local / f).is_file() for f in tokenizer_files):
            raise ConfigError(key, path, "model directory has no tokenizer (tokenizer.json / tokenizer_config.json)")
    elif path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ConfigError(key, path, "no such local path, and not a Hub id of the form org/name")
    elif constants.HF_HUB_OFFLINE and not isinstance(
            try_to_load_from_cache(path, "config.json"), str):
        raise ConfigError(key, path, "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set")


def load_model(path: str, dtype: str = "float32", device: str = "cpu", key: str = "model.path",
               device_map: str | None = None, gradient_checkpointing: bool = False):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (``auto``: see :func:`resolve_device`); the
    tokenizer gets a pad token (EOS) if it has none. ``device_map`` (e.g. ``auto``: spread over every GPU, then
    CPU) is passed to ``from_pretrained`` for models larger than one device, and then ``device`` is not used;
    ``gradient_checkpointing`` recomputes each decoder layer in the backward (``kfade.models.checkpointing``)."""
    tokenizer = load_tokenizer(path, key)
    device, dtype, _ = resolve_device(device, dtype)
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), **placement)
    except OSError as e:  # a Hub id that does not exist or cannot be reached, an unreadable weights file
        raise unreadable(key, path, e) from None
    except (ValueError, RuntimeError) as e:
        if device_map is None:
            raise
        raise ConfigError("model.device_map", device_map, str(e).splitlines()[0]) from None
    if device_map is None:
        model = model.to(device)
    model.eval()
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def load_tokenizer(path: str, key: str = "model.path"):
    """The tokenizer of the model at ``path`` (checked by :func:`check_source`), with EOS as its pad token if it
    has none."""
    check_source(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise unreadable(key, path, e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def unreadable(key: str, path: str, error: OSError) -> ConfigError:
    """A Hub id that does not exist or cannot be reached, an unreadable file: one line naming ``key``."""
    return ConfigError(key, path, f"cannot load the model: {' '.join(str(error).split())[:300]}")
