"""Interrupted work: a PCG solve and a K-FADE run resume from their checkpoints and end bit-equal to uninterrupted
ones; a run killed midway leaves no results the report would take for finished (it is listed as incomplete)."""

import copy
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_curvature_reference import batches_of, qa_sequences
from test_curvature_reference import tiny_llama as reference_llama

from kfade.curvature import CurvatureConfig
from kfade.curvature.cg import conjugate_gradient
from kfade.unlearn import UnlearnData, build_method

ROOT = Path(__file__).resolve().parents[1]


class Interrupt(Exception):
    """Stands in for a kill: raised from a progress callback, mid-solve."""


def spd_problem(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    g = a @ a.T / n
    b = {"w": torch.randn(n, generator=gen, dtype=torch.float64)}
    calls = []

    def matvec(v):
        calls.append(1)
        return {"w": g @ v["w"]}

    return matvec, b, calls


def test_pcg_resumes_from_its_checkpoint_bit_equal(tmp_path):
    matvec, b, calls = spd_problem()
    whole = conjugate_gradient(matvec, b, damping=0.1, max_iters=12)
    checkpoint = tmp_path / "cg.safetensors"

    def kill_at_7(it, _):
        if it == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        conjugate_gradient(matvec, b, damping=0.1, max_iters=12, checkpoint=checkpoint, callback=kill_at_7)
    assert checkpoint.is_file()
    calls.clear()
    seen = []
    resumed = conjugate_gradient(matvec, b, damping=0.1, max_iters=12, checkpoint=checkpoint,
                                 callback=lambda it, _: seen.append(it))
    assert seen == list(range(7, 13)) and len(calls) == 6  # iteration 7 redone (killed before it was saved)
    assert torch.equal(resumed.x["w"], whole.x["w"]) and resumed.residuals == whole.residuals
    calls.clear()
    again = conjugate_gradient(matvec, b, damping=0.1, max_iters=12, checkpoint=checkpoint)
    assert calls == [] and torch.equal(again.x["w"], whole.x["w"])  # a finished solve is returned as is
    with pytest.warns(UserWarning, match="written for another solve"):
        other = conjugate_gradient(matvec, {"w": 2 * b["w"]}, damping=0.1, max_iters=12, checkpoint=checkpoint)
    assert torch.allclose(other.x["w"], 2 * whole.x["w"])  # another right-hand side: not resumed from b's state
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated: ignored with a warning, solved afresh
    with pytest.warns(UserWarning, match="ignoring CG checkpoint"):
        fresh = conjugate_gradient(matvec, b, damping=0.1, max_iters=12, checkpoint=checkpoint)
    assert torch.equal(fresh.x["w"], whole.x["w"])


def test_killed_kfade_run_resumes_in_step_2_and_ends_bit_equal(tmp_path):
    model = reference_llama(layers=1)
    data = UnlearnData(forget=batches_of(qa_sequences(4, seed=7), 2), retain=batches_of(qa_sequences(16, seed=2), 8))
    cfg = {"solver": "cg", "n_steps": 2, "cg_iters": 4, "cg_tol": 0.0, "step_rule": "fixed", "step_size": 0.05,
           "max_kl_ratio": None}  # two steps exactly (the quadratic-regime check would split these)
    curvature = CurvatureConfig(estimator="kfac", fisher="empirical")

    def run(cache, log=None):
        copy_ = copy.deepcopy(model)
        method = build_method("kfade", cfg, curvature=curvature, cache_root=str(cache / "curvature"))
        return copy_, method.run(copy_, data, log=log)

    whole, history = run(tmp_path / "a")

    def kill(record):
        if record.get("cg/step") == 2 and record.get("cg/iteration") == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "b", kill)
    assert len(list((tmp_path / "b" / "cg").iterdir())) == 1  # the killed run's checkpoints
    records = []
    resumed, again = run(tmp_path / "b", records.append)
    iterations = [(r["cg/step"], r["cg/iteration"]) for r in records if "cg/iteration" in r]
    assert iterations == [(2, 2), (2, 3), (2, 4)]  # step 1 came from its finished checkpoint, step 2 resumed
    for name, p in whole.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    strip = [{k: v for k, v in r.items() if k != "ggn_products"} for r in history]
    assert [{k: v for k, v in r.items() if k != "ggn_products"} for r in again] == strip
    assert list((tmp_path / "b" / "cg").iterdir()) == []  # removed once the run ended


def test_a_killed_run_leaves_no_results_and_the_report_lists_it_incomplete(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    done = sweep / "0"
    (done / ".hydra").mkdir(parents=True)
    (done / "results.json").write_text('{"method": "grad_ascent", "forget/prob": 0.5}\n')
    env = {**os.environ, "KFADE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    killed = sweep / "1"
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "run.py"), "logger=none", "progress=false",
                             f"hydra.run.dir={killed}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    started = any(line.startswith("dir: ") for line in proc.stdout)  # the header: configs checked, work starts
    time.sleep(1.0)  # into data building / model training
    proc.send_signal(signal.SIGKILL)
    assert started and proc.wait(timeout=30) == -signal.SIGKILL  # killed mid-run, not finished or failed
    assert (killed / ".hydra" / "config.yaml").is_file()
    assert not (killed / "results.json").exists() and not (killed / "delta.safetensors").exists()
    assert runpy.run_path(str(ROOT / "experiments" / "report.py"))["main"]([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "- 1: incomplete: no results.json" in out and "grad_ascent" in out
