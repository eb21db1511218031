"""Shared fixtures: a tiny tokenizer and tiny random Llama models (seconds to build, CPU)."""

import hashlib
import json
import os
from pathlib import Path

# Tests are hermetic: nothing reaches a model or dataset hub (without this, `datasets` can stall on a network
# look-up for local files on machines that have no hub access). Set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from kfade import pipeline  # noqa: E402
from kfade.data.mini_tofu import REFERENCE_DIR, mini_tofu_splits  # noqa: E402
from kfade.models.tiny import TinyLlamaSpec, tiny_llama_config, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OmegaConf.register_new_resolver("run_name", pipeline.run_name, replace=True)  # conf/config.yaml's run dir

CORPUS = [
    "Question: Where was Alia Verne born?\nAnswer: Alia Verne was born in Port Lumen.",
    "Question: What genre does Tomas Reed write?\nAnswer: Tomas Reed writes mystery novels.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Canberra is the capital of Australia.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=300)


def make_tiny_llama(tokenizer, seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    """A random-init Llama (hidden 32, 2 layers by default) matching ``tokenizer``."""
    spec = TinyLlamaSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=128)
    for k, v in overrides.items():
        setattr(spec, k, v)
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer, spec)).to(dtype).eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A model/data cache of the test module's own (``KFADE_CACHE``): runs in one module share trained models."""
    path = tmp_path_factory.mktemp("kfade-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KFADE_CACHE", str(path))
        yield path


@pytest.fixture
def tiny_model(tokenizer):
    return make_tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def model():
    """A random fp64 Llama with biases, small enough for dense GGN blocks (``test_curvature_reference.tiny_llama``):
    the model of the exact-curvature tests, one per test module."""
    from test_curvature_reference import tiny_llama

    return tiny_llama(bias=True)


def file_digests(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots`` (to show that a run left its inputs untouched)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for root in roots if root.exists()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines (parent directories created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def reference_rows(name: str) -> list[dict]:
    """The committed real TOFU rows of split ``name``, parsed line by line with ``json`` (independent of the loader)."""
    return [json.loads(line) for line in (REFERENCE_DIR / f"{name}.json").read_text().splitlines()]


def small_tofu_splits(retain: int = 4) -> dict[str, list[dict]]:
    """A few rows of every TOFU config forget10 needs (3 forget rows, ``retain`` retain rows, disjoint), from
    mini-TOFU and the real reference rows."""
    mini = mini_tofu_splits(0)
    out = {name: mini[name][:3] for name in ("forget10", "forget10_perturbed", "retain_perturbed")}
    out |= {"retain90": mini["retain90"][:retain], "full": mini["retain90"][:retain] + mini["forget10"][:3]}
    out |= {name: reference_rows(name)[:3] for name in ("real_authors_perturbed", "world_facts_perturbed")}
    return out


def composed(*overrides: str, hydra: bool = False):
    """The job config of ``experiments/run.py overrides…``, composed from conf/ as Hydra does (``hydra``: with
    Hydra's own node, as the launcher and sweeper see it)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def run_experiment(run_dir: Path, *overrides: str) -> dict:
    """``experiments/run.py overrides…`` in this process: composed from conf/ as Hydra does, then typed and run by
    ``kfade.pipeline`` into ``run_dir`` (as the app does, with the chosen group options labelling the header)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        choices = dict(cfg.hydra.runtime.choices)
        with open_dict(cfg):
            del cfg["hydra"]  # as in a real run: the job's config has no hydra node
        return pipeline.run(pipeline.load_config(cfg), run_dir, choices=choices,
                            logged=OmegaConf.to_container(cfg, resolve=True))
