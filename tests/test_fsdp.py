"""FSDP (``distributed.strategy=fsdp``) on CPU with gloo: two processes, each holding half of every parameter
(torch's ``fully_shard``) and the factors of the layers it owns, give the one-process results on the same
batches — factors, G·v, the forget gradient, the K-FADE delta (direct and CG) and a first-order baseline — and
store about half of the factor bytes each. fp64 models and the empirical Fisher (no random draws), so results
agree to summation order."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_curvature_reference import assert_blocks_close, batches_of, dense_blocks, qa_sequences, tiny_llama

from kfade import fsdp
from kfade.curvature import Curvature, CurvatureConfig, GaussNewton, fit_curvature
from kfade.curvature.curvature import MANIFEST_FILE
from kfade.curvature.estimators import estimator
from kfade.curvature.layers import LayerSpec
from kfade.curvature.owners import assign_owners
from kfade.curvature.sharded import ShardedCurvature
from kfade.curvature.sharded_ggn import gauss_newton
from kfade.errors import ConfigError
from kfade.unlearn import UnlearnData, build_method
from kfade.unlearn.losses import forget_gradient

CFG = CurvatureConfig(estimator="ekfac", fisher="empirical", damping=0.1, damping_mode="global")
BATCHES = batches_of(qa_sequences(7, seed=4), 3)  # 3, 3, 1 sequences: rank 1 gets one batch (and a padding pass)
FORGET = batches_of(qa_sequences(5, seed=9), 2)
KFADE = {"solver": "direct", "step_rule": "fixed", "step_size": 1e-3, "n_steps": 1, "max_kl_ratio": None}
KFADE_CG = {"solver": "cg", "step_rule": "trust_region", "kl_budget": 1e-3, "n_steps": 2, "cg_iters": 3,
            "max_kl_ratio": None, "max_backtracks": 0}


def model():
    return tiny_llama(layers=2, bias=True)


def names_of(m):
    return [n for n, _ in m.named_parameters() if ".layers." in n and "proj" in n]


def random_vector(m, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in m.named_parameters() if n in names_of(m)}


def kfade_delta(m, method_cfg, cache):
    before = {n: fsdp.full(p.detach()).clone() for n, p in m.named_parameters()}
    data = UnlearnData(forget=FORGET, retain=BATCHES, fit=BATCHES)
    build_method("kfade", method_cfg, curvature=CFG, cache_root=cache).run(m, data)
    return {n: fsdp.full(p.detach()) - before[n] for n, p in m.named_parameters()}


def _worker(rank, init_file, out, full):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        m = fsdp.shard_model(model())
        params = dict(m.named_parameters())
        curv = fit_curvature(m, BATCHES[rank::2], CFG)  # the caller shards the batches (as load_or_fit does)
        assert isinstance(curv, ShardedCurvature)
        curv.save(f"{out}/sharded")
        ggn = gauss_newton(m, BATCHES, names_of(m))
        v = {n: fsdp.shard_like(t, params[n]) for n, t in random_vector(m, 3).items()}
        results |= {f"gv/{n}": fsdp.full(t) for n, t in ggn(v).items()}
        results |= {f"precondition/{n}": fsdp.full(t) for n, t in curv.precondition(v).items()}
        results["predicted_kl"] = torch.tensor(curv.predicted_kl(v))
        grads, scores = forget_gradient(m, FORGET, names_of(m))
        results |= {f"grad/{n}": fsdp.full(t) for n, t in grads.items()} | {"prob": torch.tensor(scores.prob)}
        results |= {f"direct/{n}": t for n, t in kfade_delta(m, KFADE, f"{out}/cache{rank}").items()}
        if full:
            resharded = ShardedCurvature.load(f"{out}/single")  # written by one process: re-sharded on reading
            results |= {f"resharded/{n}": fsdp.full(t) for n, t in resharded.precondition(v).items()}
            results |= {f"cg/{n}": t for n, t in kfade_delta(fsdp.shard_model(model()), KFADE_CG,
                                                             f"{out}/cache-cg").items()}
            ga = fsdp.shard_model(model())
            before = {n: fsdp.full(p.detach()).clone() for n, p in ga.named_parameters()}
            build_method("grad_ascent", {"epochs": 2, "lr": 1e-2}).run(ga, UnlearnData(forget=FORGET))
            results |= {f"ga/{n}": fsdp.full(p.detach()) - before[n] for n, p in ga.named_parameters()}
        if rank == 0:
            save_file({k: t.contiguous() for k, t in results.items()}, f"{out}/results.safetensors")
    finally:
        dist.destroy_process_group()


def one_process(tmp_path, full):
    m = model()
    curv = fit_curvature(m, BATCHES, CFG)
    want = {}
    v = random_vector(m, 3)
    want |= {f"gv/{n}": t for n, t in GaussNewton(m, BATCHES, names_of(m))(v).items()}
    want |= {f"precondition/{n}": t for n, t in curv.precondition(v).items()}
    want["predicted_kl"] = torch.tensor(curv.predicted_kl(v))
    grads, scores = forget_gradient(m, FORGET, names_of(m))
    want |= {f"grad/{n}": t for n, t in grads.items()} | {"prob": torch.tensor(scores.prob)}
    want |= {f"direct/{n}": t for n, t in kfade_delta(m, KFADE, tmp_path / "cache").items()}
    if full:
        want |= {f"resharded/{n}": t for n, t in curv.precondition(v).items()}
        want |= {f"cg/{n}": t for n, t in kfade_delta(model(), KFADE_CG, tmp_path / "cache-cg").items()}
        ga = model()
        before = {n: p.detach().clone() for n, p in ga.named_parameters()}
        build_method("grad_ascent", {"epochs": 2, "lr": 1e-2}).run(ga, UnlearnData(forget=FORGET))
        want |= {f"ga/{n}": p.detach() - before[n] for n, p in ga.named_parameters()}
    return curv, want


def run_two_processes(tmp_path, full):
    if full:  # the workers re-shard the 1-process cache
        fit_curvature(model(), BATCHES, CFG).save(tmp_path / "single")
    # forked before this process computes anything (no thread pools to inherit), so the workers skip the imports
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), full), nprocs=2, join=True,
                       start_method="fork")
    reference, want = one_process(tmp_path, full)
    got = load_file(tmp_path / "results.safetensors")
    assert set(got) == set(want)
    for key, w in want.items():
        scale = float(w.abs().max()) or 1.0
        torch.testing.assert_close(got[key], w, rtol=1e-9, atol=1e-10 * scale, msg=key)
    return reference


def test_two_fsdp_processes_equal_one_process(tmp_path):
    reference = run_two_processes(tmp_path, full=False)
    stored = Curvature.load(tmp_path / "sharded")  # one process reads the cache two ranks wrote
    assert stored.n_tokens == reference.n_tokens
    assert_blocks_close(dense_blocks(stored), dense_blocks(reference), rtol=1e-9)
    manifest = json.loads((tmp_path / "sharded" / MANIFEST_FILE).read_text())
    owners = manifest["shards"]["owners"]
    assert manifest["shards"]["world_size"] == 2 and set(owners.values()) == {0, 1}
    per_rank = [sum((tmp_path / "sharded" / f"{layer}.safetensors").stat().st_size
                    for layer, rank in owners.items() if rank == r) for r in range(2)]
    assert all(abs(b / sum(per_rank) - 0.5) < 0.1 for b in per_rank), per_rank  # each rank ~1/2 of the bytes


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process_for_cg_baselines_and_resharding(tmp_path):
    run_two_processes(tmp_path, full=True)


def test_owners_balance_bytes_and_keep_activation_groups_together():
    layers = [LayerSpec(f"l{i}.{p}", f"l{i}.{p}.weight", None, out * (1 + i % 3), 64) for i in range(8)
              for p, out in (("q", 64), ("k", 16), ("v", 16), ("up", 256))]
    groups = {s.name: s.name.split(".")[0] + ".q" for s in layers}  # one shared input per block
    owners = assign_owners(layers, groups, "ekfac", 3)
    assert all(owners[s.name] == owners[groups[s.name]] for s in layers)
    stored = estimator("ekfac").stored_elements
    unit = {g: sum(sum(stored(s, s.name == g).values()) for s in layers if groups[s.name] == g)
            for g in set(groups.values())}
    load = [sum(size for g, size in unit.items() if owners[g] == r) for r in range(3)]
    assert max(load) - min(load) <= max(unit.values())  # greedy largest-first: within one unit of each other
    assert min(load) > 0.25 * sum(load)
    assert assign_owners(layers, groups, "ekfac", 3) == owners  # deterministic


def test_fsdp_without_torchrun_is_one_config_error(monkeypatch):
    from kfade.distributed import DistributedConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"distributed.strategy='fsdp': needs torchrun"):
        DistributedConfig(strategy="fsdp").check_launch()
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"distributed.world_size=8: but torchrun started 4"):
        DistributedConfig(strategy="fsdp", world_size=8).check_launch()
    with pytest.raises(ConfigError, match=r"distributed.strategy='zero3'"):
        DistributedConfig(strategy="zero3")
