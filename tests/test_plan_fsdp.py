"""Per-rank memory plans for ``distributed.strategy=fsdp``: what is sharded (the reference and the unlearned copy,
the pre-step copy, the gradient, direction and CG vectors, the factors by owner) against the same run on one
process, and the Llama-3-70B plans on 8 × 141 GB from its shipped config (offline, seconds)."""

from pathlib import Path

import pytest
from conftest import composed
from transformers import AutoConfig

from kfade.curvature.config import DEFAULT_MODULES
from kfade.curvature.owners import assign_owners
from kfade.errors import ConfigError
from kfade.pipeline import load_config, run
from kfade.plan import GB, Placement, Workload, architecture, layer_rows, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def items(plan, prefix):
    return sum(i.nbytes for i in plan.items if i.name.startswith(prefix))


def test_fsdp_shards_the_copy_vectors_and_factors_per_rank():
    arch = architecture(AutoConfig.from_pretrained(ROOT / "conf/fixtures/models/locuslab--tofu_ft_llama2-7b"),
                        DEFAULT_MODULES)
    one = plan_memory(arch, Workload(solver="cg"), Placement())
    fsdp = plan_memory(arch, Workload(solver="cg", world_size=8, strategy="fsdp"), Placement())
    replicated = plan_memory(arch, Workload(solver="cg", world_size=8), Placement())
    assert [(i.name, i.nbytes) for i in replicated.items] == [(i.name, i.nbytes) for i in one.items]
    for prefix in ("forget gradient", "K-FADE direction", "CG vectors", "weights: unlearned copy",
                   "weights: reference", "weights: pre-step copy"):
        assert items(fsdp, prefix) == pytest.approx(items(one, prefix) / 8, rel=1e-9), prefix
    assert items(fsdp, "weights: loading one model on the host") == items(one, "weights: loading")  # rank 0 reads it
    rows = layer_rows(arch, "ekfac", 4)
    owners = assign_owners(arch.layers, arch.groups, "ekfac", 8)
    per_rank = [sum(r["A"] + r["S"] + r["eig"] for r in rows if owners[r["name"]] == k) for k in range(8)]
    stored = items(fsdp, "curvature, ekfac as stored")
    assert stored == max(per_rank) and stored < 1.05 * items(one, "curvature, ekfac as stored") / 8


def plan_70b(*overrides):
    cfg = composed("experiment=paper_wmdp_llama3_8b", "model=llama3_70b_instruct", "dry_run=true", "memory.gpu_gb=141",
                   "memory.cpu_gb=2000", "distributed.strategy=fsdp", "distributed.world_size=8", *overrides)
    return run(load_config(cfg), Path("/nonexistent"))


def peaks(info):
    """(fits, device peak GB, host peak GB) of a plan."""
    plan = info["plan"]
    return info["fits"], round(plan.peak("device") / GB, 2), round(plan.peak("cpu") / GB, 2)


def test_llama3_70b_direct_on_8_h200_per_rank(capsys):
    direct = plan_70b("method.solver=direct", "dataset.batch_size=1")
    out = capsys.readouterr().out
    assert "70.6B parameters" in out and "per rank: 8 ranks, distributed.strategy=fsdp" in out
    assert "weights: reference (bfloat16, 1/8) | all | cuda | 17.64 |" in out  # sharded, no longer 141.1 GB
    assert "weights: loading one model on the host (bfloat16, rank 0 only) | load | cpu | 141.11 |" in out
    assert "forget gradient (fp32, 1/8) | step | cuda | 34.23 |" in out
    assert peaks(direct) == (True, 131.79, 183.82)  # the fit phase; factors in pinned host memory, 64 layer groups


def test_llama3_70b_cg_on_8_h200_needs_bf16_host_vectors():
    assert peaks(plan_70b("method.solver=cg", "dataset.batch_size=1")) == (False, 371.44, 141.11)  # 7 × 34.2 GB
    bf16 = plan_70b("method.solver=cg", "dataset.batch_size=1", "method.cg_dtype=bfloat16")
    assert peaks(bf16) == (False, 251.65, 141.11)  # 7 bf16 vectors on the device: 119.8 GB
    assert peaks(plan_70b("method.solver=cg", "dataset.batch_size=1", "method.cg_offload=cpu")) == (
        False, 120.31, 347.28)  # fp32 vectors in host memory: 347 GB per rank against 250
    assert peaks(plan_70b("method.solver=cg", "dataset.batch_size=1", "method.cg_offload=cpu",
                          "method.cg_dtype=bfloat16")) == (True, 131.79, 227.49)


def test_bad_distributed_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"^distributed.world_size=0"):
        plan_70b("distributed.world_size=0")
