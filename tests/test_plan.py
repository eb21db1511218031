"""The memory plan's arithmetic: hand-counted factor sizes of the paper's models (config fixtures), exactly what
``fit_curvature`` stores on tiny models, the placement search, and the ``dry_run=true`` entry point."""

import re
from pathlib import Path

import pytest
import torch
from conftest import composed
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, PhiConfig, PhiForCausalLM

from kfade.curvature import CurvatureConfig, fit_curvature
from kfade.curvature.config import DEFAULT_MODULES
from kfade.errors import ConfigError
from kfade.pipeline import load_config, run
from kfade.pipeline.plan import plan_run, planned_method
from kfade.plan import (
    GB,
    MemoryConfig,
    Placement,
    Workload,
    architecture,
    factor_totals,
    layer_rows,
    plan_memory,
    resolve_placement,
)
from kfade.plan.memory import activation_bytes, eigh_workspace_bytes, layer_chunks

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "conf" / "fixtures" / "models"
LLAMA2 = FIXTURES / "locuslab--tofu_ft_llama2-7b"


@pytest.fixture(scope="module")
def llama2():
    return architecture(AutoConfig.from_pretrained(LLAMA2), DEFAULT_MODULES)


def test_llama2_7b_kfac_factors_are_the_issues_63_7_gb(llama2):
    h, m, n = 4096, 11008, 32
    t = factor_totals(llama2)
    # shared activation factors once: A of q/k/v, o, gate/up (h×h) and down (m×m); S of q,k,v,o (h×h), gate, up
    # (m×m), down (h×h) — per block
    assert t["A"] == n * (3 * h * h + m * m) and t["S"] == n * (5 * h * h + 2 * m * m)
    kfac_gb = 4 * (t["A"] + t["S"]) / GB
    assert kfac_gb == pytest.approx(63.7, rel=0.02) and round(kfac_gb, 2) == 63.71
    assert 4 * (t["A_unshared"] + t["S"]) / GB == pytest.approx(70.2, rel=0.002)  # the issue's upper figure
    ekfac = sum(r["A"] + r["S"] + r["eig"] for r in layer_rows(llama2, "ekfac", 4))
    assert ekfac == 4 * (t["A"] + t["S"] + n * (4 * h * h + 3 * h * m))  # + Λ* (out × in per layer): ~90 GB
    assert round(ekfac / GB, 2) == 89.62
    assert llama2.n_params == 6_738_415_616 and len(llama2.layers) == 7 * n


def test_shared_inputs_are_traced_per_architecture(llama2):
    g = llama2.groups
    q = "model.layers.5.self_attn.q_proj"
    assert g["model.layers.5.self_attn.k_proj"] == g["model.layers.5.self_attn.v_proj"] == g[q] == q
    assert g["model.layers.5.mlp.up_proj"] == "model.layers.5.mlp.gate_proj"
    assert g["model.layers.5.self_attn.o_proj"] == "model.layers.5.self_attn.o_proj"
    zephyr = architecture(AutoConfig.from_pretrained(FIXTURES / "HuggingFaceH4--zephyr-7b-beta"), DEFAULT_MODULES)
    k = next(s for s in zephyr.layers if s.name.endswith("0.self_attn.k_proj"))
    assert (k.out_features, k.in_features) == (1024, 4096)  # 8 KV heads of 128
    phi = architecture(AutoConfig.from_pretrained(FIXTURES / "locuslab--tofu_ft_phi-1.5"), DEFAULT_MODULES)
    fc1 = next(s for s in phi.layers if s.name.endswith("0.mlp.fc1"))
    assert (fc1.out_features, fc1.in_features) == (8192, 2049)  # bias: in' = in + 1
    # a parallel block: q/k/v and fc1 read the same layer-normed input; dense and fc2 their own
    assert phi.groups[fc1.name] == "model.layers.0.self_attn.q_proj" and len(set(phi.groups.values())) == 3 * 24


def _tiny_phi():
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=32)
    return PhiForCausalLM(cfg).eval()


@pytest.mark.parametrize("estimator", ["kfac", "ekfac", "diagonal"])
@pytest.mark.parametrize("which", ["llama", "phi"])
def test_plan_counts_exactly_what_fit_curvature_stores(tiny_model, estimator, which):
    model = tiny_model if which == "llama" else _tiny_phi()
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, vocab, (2, 6))), "attention_mask": torch.ones_like(ids),
                "labels": ids} for _ in range(2)]
    curv = fit_curvature(model, batches, CurvatureConfig(estimator=estimator, fisher="empirical"))
    arch = architecture(model.config, DEFAULT_MODULES)
    stored = sum(t.numel() * t.element_size() for t in curv.tensors.values())
    assert sum(r["A"] + r["S"] + r["eig"] for r in layer_rows(arch, estimator, 4)) == stored
    params = dict(model.named_parameters())
    assert factor_totals(arch)["params"] == sum(params[n].numel() for n in curv.param_names)


CG_VECTORS = 7  # x, r, z, p, (G+λI)p, new x, new r: what kfade.curvature.cg holds at its peak


def test_step_items_and_layer_groups(llama2):
    params = factor_totals(llama2)["params"]
    cg_plan = plan_memory(llama2, Workload(solver="cg"), Placement())
    cg = {i.name: i for i in cg_plan.items}
    direct = {i.name: i for i in plan_memory(llama2, Workload(solver="direct"), Placement()).items}
    cg_item = next(i for n, i in cg.items() if n.startswith("CG vectors"))
    assert cg_item.nbytes == CG_VECTORS * 4 * params and not any(n.startswith("CG") for n in direct)
    assert cg["forget gradient (fp32)"].nbytes == cg["K-FADE direction (fp32)"].nbytes == 4 * params
    half = plan_memory(llama2, Workload(solver="cg", cg_dtype="bfloat16"), Placement())
    assert next(i for i in half.items if i.name.startswith("CG vectors")).nbytes == CG_VECTORS * 2 * params
    host = plan_memory(llama2, Workload(solver="cg", cg_offload="cpu"), Placement())
    vectors = next(i for i in host.items if i.name.startswith("CG vectors"))
    in_flight = next(i for i in host.items if i.name.startswith("CG vector in flight"))
    assert vectors.where == "cpu" and in_flight.where == "device" and in_flight.nbytes == (2 + 4) * params
    moved = (CG_VECTORS + 2) * 4 * params  # the vectors, the forget gradient and the direction go to the host
    assert host.total("device", "step") == cg_plan.total("device", "step") - moved + 6 * params
    assert host.total("cpu", "step") == cg_plan.total("cpu", "step") + moved
    targets = plan_memory(llama2, Workload(solver="cg", forget_targets=True), Placement())
    assert targets.total("device", "load") == cg_plan.total("device", "load") + 2 * llama2.n_params  # bf16 base
    assert targets.peak("device") == cg_plan.peak("device")  # it is released before the fit and the steps
    names = ["l.0.attn.q", "l.0.attn.k", "l.0.mlp.up", "l.1.attn.q", "l.1.mlp.up"]  # whole modules stay together
    assert layer_chunks(names, 2) == [[0, 1, 2], [3, 4]] and len(layer_chunks(names, 9)) == 4

    def sums(groups):
        plan = plan_memory(llama2, Workload(estimator="kfac"), Placement(layer_groups=groups))
        return next(i.nbytes for i in plan.items if i.name.startswith("factor sums"))

    assert sums(1) == 4 * (factor_totals(llama2)["A"] + factor_totals(llama2)["S"])
    assert sums(4) == sums(1) / 4  # 8 identical blocks per group


def test_fit_items_eigh_workspace_and_vocabulary_wide_activations(llama2):
    h, m, n, vocab = 4096, 11008, 32, 32000
    # eigh of n×n: fp32 normalised sum 4n², fp64 copy + symmetrised copy + eigenvectors 24n², eigenvalues 8n,
    # LAPACK dsyevd work (1 + 6n + 2n²) doubles and iwork (3 + 5n) int32
    assert eigh_workspace_bytes(m) == 44 * m * m + 76 * m + 20
    work = Workload(estimator="kfac", solver="direct", model_dtype="float32", batch_size=1, max_length=1)
    items = {i.name: i.nbytes for i in plan_memory(llama2, work, Placement()).items}
    assert items[f"eigh workspace, largest factor ({m}², fp64)"] == eigh_workspace_bytes(m)
    inputs, outputs = n * (3 * h + m), n * (5 * h + 2 * m)  # one token: shared inputs once; every output
    # fit: logits, label logits, softmax + (signal, logits' gradient) per MC sample; captured inputs, output grads
    assert items["activations + captured inputs / output grads, one batch (estimate)"] == (
        4 * (inputs + outputs) + 5 * 4 * vocab + 4 * (inputs + outputs))
    assert items["activations, one batch (estimate)"] == 4 * (inputs + outputs) + 3 * 4 * vocab  # step


def test_placement_is_the_cheapest_that_fits(llama2):
    work = Workload(estimator="kfac", solver="direct")
    placement, plan, fits = resolve_placement(llama2, work, MemoryConfig(), device_budget=141 * GB,
                                              cpu_budget=512 * GB)
    assert fits and plan.peak("device") <= 141 * GB
    assert (placement.offload, placement.layer_groups) == ("cpu", 1)  # in-memory factors do not fit 141 GB
    assert not plan_memory(llama2, work, Placement()).fits(141 * GB, 512 * GB)
    assert plan.peak("cpu") >= 63.7 * GB  # the pinned factors
    small, plan, fits = resolve_placement(llama2, work, MemoryConfig(), device_budget=110 * GB, cpu_budget=40 * GB)
    assert fits and small.offload == "disk" and small.layer_groups > 1
    forced, plan, fits = resolve_placement(llama2, work, MemoryConfig(offload="none", layer_groups=1),
                                           device_budget=80 * GB, cpu_budget=None)
    assert (forced.offload, forced.layer_groups, fits) == ("none", 1, False)


def test_dry_run_prints_the_plan_of_the_7b_experiment_without_network_or_weights(capsys, tmp_path):
    """``run(config)`` with ``dry_run=true`` (in-process; tests/test_scale_slow.py runs the same through the CLI)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=tofu_llama2_7b", "dry_run=true",
                                                       "method.solver=direct", "memory.gpu_gb=141",
                                                       "memory.cpu_gb=512"])
    info = run(load_config(cfg), tmp_path)
    out = capsys.readouterr().out
    assert "K-FAC factors A + S, fp32, shared A once: 63.71 GB" in out
    assert "conf/fixtures/models/locuslab--tofu_ft_llama2-7b" in out and info["fits"]
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"total peak: \d+\.\d\d GB on cuda, \d+\.\d\d GB on cpu", last)
    plan = info["plan"]
    assert last == f"total peak: {plan.peak('device') / GB:.2f} GB on cuda, {plan.peak('cpu') / GB:.2f} GB on cpu"
    assert not list(tmp_path.iterdir())  # nothing written, nothing loaded


def test_retained_graphs_are_planned_and_kept_only_where_they_fit(llama2):
    """``cg_retain_graphs`` null: kept on the tiny CPU model (the default run), not for the 7B model on a 141 GB
    GPU, nor under FSDP, forward mode, gradient checkpointing or cg_batches null; true / false are kept as given.
    The plan counts 2 × one batch's activations (eager attention) per retained batch."""
    work = Workload(solver="cg", batch_size=4, max_length=512)
    plain = plan_memory(llama2, work, Placement())
    kept = plan_memory(llama2, Workload(solver="cg", batch_size=4, max_length=512, retained_graphs=8), Placement())
    item = next(i for i in kept.items if i.name.startswith("retained graphs of 8 product batches"))
    assert item.nbytes == 2 * 8 * activation_bytes(llama2, work, False, True)
    assert kept.total("device", "step") == plain.total("device", "step") + item.nbytes

    def planned(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["logger=none", *overrides])
        return planned_method(load_config(cfg)).cg_retain_graphs

    assert planned() is True
    assert planned("experiment=tofu_llama2_7b", "dry_run=true", "memory.gpu_gb=141", "memory.cpu_gb=512") is False
    fsdp = ["distributed.strategy=fsdp", "distributed.world_size=2", "dry_run=true"]
    for off in (fsdp, ["method.ggn_mode=forward"], ["model.gradient_checkpointing=true"], ["method.cg_batches=null"],
                ["method.cg_retain_graphs=false"], ["memory.cpu_gb=0.001"]):
        assert planned(*off) is False, off
    assert planned("method.cg_retain_graphs=true", "memory.cpu_gb=0.001") is True


def test_retaining_every_fitting_batchs_graphs_is_planned_from_the_fit_budget_or_refused():
    """``cg_retain_graphs: true`` with ``cg_batches: null`` keeps a graph per fitting batch: the plan counts
    ``dataset.fit_max_batches`` of them; with no such budget it cannot count them, and the config is refused in one
    line when it is loaded (before any work)."""
    def config(*overrides):
        return load_config(composed("logger=none", "method.cg_retain_graphs=true", "method.cg_batches=null",
                                    *overrides))

    assert plan_run(config("dataset.fit_max_batches=20"))["workload"].retained_graphs == 20
    with pytest.raises(ConfigError, match=r"^method\.cg_retain_graphs=True: .*dataset\.fit_max_batches"):
        config()


def test_a_hub_id_that_is_not_local_is_one_error_naming_model_path(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=hf", "model.path=org/not-here", "dry_run=true"])
    with pytest.raises(ConfigError, match=r"model.path='org/not-here': config not available offline"):
        run(load_config(cfg), tmp_path)


@pytest.mark.parametrize(("field", "value"), [("gpu_gb", -1.0), ("offload", "tape"), ("layer_groups", 0)])
def test_bad_memory_settings_are_one_line_errors(field, value):
    with pytest.raises(ConfigError, match=rf"^memory.{field}="):
        MemoryConfig(**{field: value})
