"""A whole run under ``distributed.strategy=fsdp`` with 2 gloo processes equals the 1-process run: the reference,
retrain and unlearned models are FSDP-sharded (loaded without a whole model per rank), scored by both ranks in
lockstep (TOFU losses, greedy generation, KL to the reference and retrain models), and the delta is gathered onto
rank 0. An fp64 tiny model and the empirical Fisher (no random draws), so results agree to summation order."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import run_experiment
from test_run import FAST

from kfade.errors import ConfigError
from kfade.pipeline import load_config
from kfade.unlearn import load_delta

KFADE = ["method=kfade", "method.solver=direct", "method.step_rule=fixed", "method.step_size=0.05",
         "method.n_steps=1", "method.max_kl_ratio=null", "curvature.fisher=empirical", "model.dtype=float64"]


def _worker(rank, init_file, out, overrides):
    torch.set_num_threads(1)
    os.environ |= {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        run_experiment(out / f"rank{rank}", *FAST, *overrides, "distributed.strategy=fsdp")
    finally:
        dist.destroy_process_group()


def sharded_and_single(cache, tmp_path, *overrides):
    """results.json and the delta of a 2-process FSDP run, then of one process on the same cached models (with
    the baseline scores and the curvature computed again)."""
    mp.start_processes(_worker, args=(str(tmp_path / "init"), tmp_path, overrides), nprocs=2, join=True,
                       start_method="fork")
    assert not (tmp_path / "rank1" / "results.json").exists()  # rank 0 alone writes
    for entry in ("evals", "curvature"):
        shutil.rmtree(cache / entry, ignore_errors=True)
    run_experiment(tmp_path / "single", *FAST, *overrides)
    return [(json.loads((tmp_path / d / "results.json").read_text()), load_delta(tmp_path / d / "delta.safetensors"))
            for d in ("rank0", "single")]


def assert_same(got, want):
    assert set(got) == set(want)
    for key, w in want.items():
        if key.startswith("time/") or key.startswith("hp/") or not isinstance(w, float):
            assert key.startswith("time/") or got[key] == w, key
        else:
            assert got[key] == pytest.approx(w, rel=1e-9, abs=1e-12), key


@pytest.mark.slow
def test_fsdp_run_scores_and_delta_equal_one_process(cache, tmp_path):
    (results, (delta, meta)), (want, (want_delta, want_meta)) = sharded_and_single(cache, tmp_path, *KFADE)
    assert_same(results, want)
    assert meta["base_fingerprint"] == want_meta["base_fingerprint"] and set(delta) == set(want_delta)
    for name, d in want_delta.items():
        torch.testing.assert_close(delta[name], d, rtol=1e-9, atol=1e-12 * float(d.abs().max()), msg=name)
    assert results["steps"] == 1 and results["kl_reference/retain"] > 0


@pytest.mark.parametrize(("override", "key"), [("eval.audits=[relearn]", "eval.audits"),
                                               ("reapply.epochs=1", "reapply.epochs"),
                                               ("model.device_map=auto", "model.device_map")])
def test_what_fsdp_cannot_run_is_one_config_error(override, key):
    from conftest import composed

    cfg = composed(override, "distributed.strategy=fsdp", "distributed.world_size=2", "dry_run=true")
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(cfg)

