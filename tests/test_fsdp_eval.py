"""Evaluation on FSDP-sharded models (``distributed.strategy=fsdp``) with 2 gloo processes equals one process: a
model loaded sharded (no whole model on any rank but rank 0's host copy) and a sharded copy of it give the same
logits, KL, greedy generations, int8 copy and delta (gathered onto rank 0); a whole run — reference, retrain and
unlearned models sharded and scored by both ranks in lockstep — gives the 1-process results. fp64 tiny models and
the empirical Fisher (no random draws), so results agree to summation order."""

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import composed, make_tiny_llama, run_experiment
from safetensors.torch import load_file, save_file
from test_run import FAST

from kfade import fsdp
from kfade.data.formatting import QAFormatter, qa_batches
from kfade.errors import ConfigError
from kfade.eval import mean_token_kl
from kfade.eval.generation import greedy_generate
from kfade.eval.modes import evaluating
from kfade.eval.quantize import quantized
from kfade.models.load import load_model
from kfade.models.logits import label_logits
from kfade.pipeline import load_config
from kfade.unlearn import compute_delta, load_delta

CHANGED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight")


def evaluate(model, tokenizer):
    """What scoring does with a model and a changed copy of it: logits, KL, greedy answers, int8 logits, delta."""
    formatter = QAFormatter(tokenizer, 64)
    batches = qa_batches([{"question": "Where was Alia Verne born?", "answer": "Port Lumen."},
                          {"question": "What genre?", "answer": "Mystery novels, mostly."}], formatter, 2)
    changed = fsdp.copy_model(model)
    before = {n: fsdp.local(p.detach()).clone() for n, p in changed.named_parameters()}
    params = dict(changed.named_parameters())
    for name in CHANGED:
        fsdp.assign(params[name], fsdp.full(params[name].detach()) * 1.5)
    with evaluating(model, changed):
        out = {"logits": label_logits(model, batches[0]).logits,
               "int8": label_logits(quantized(changed, 8), batches[0]).logits,
               "kl": torch.tensor(mean_token_kl(model, changed, batches))}
    answers = greedy_generate(changed, formatter, ["Where was Alia Verne born?", "What genre?"], 6, 1)
    return out | {f"delta/{n}": d for n, d in compute_delta(before, changed).items()}, answers


def _load_worker(rank, init_file, model_dir, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model, tokenizer = fsdp.load_sharded(str(model_dir), "float64", "cpu")
        assert fsdp.is_sharded(model) and all(fsdp.local(p).shape[0] < p.shape[0] for p in model.parameters()
                                              if p.shape[0] > 1)
        tensors, answers = evaluate(model, tokenizer)
        if rank == 0:
            save_file({k: t.contiguous() for k, t in tensors.items()}, f"{out}/sharded.safetensors")
            (out / "answers.json").write_text(json.dumps(answers))
        else:
            assert not any(k.startswith("delta/") for k in tensors)  # gathered onto rank 0 only
    finally:
        dist.destroy_process_group()


def test_sharded_load_copy_scores_and_delta_equal_one_process(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer, dtype=torch.float64)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    mp.start_processes(_load_worker, args=(str(tmp_path / "init"), tmp_path / "model", tmp_path), nprocs=2,
                       join=True, start_method="fork")
    want, answers = evaluate(*load_model(str(tmp_path / "model"), "float64", "cpu"))
    got = load_file(tmp_path / "sharded.safetensors")
    assert set(got) == set(want) and {f"delta/{n}" for n in CHANGED} <= set(want)
    for key, w in want.items():
        torch.testing.assert_close(got[key], w, rtol=1e-9, atol=1e-12 * float(w.abs().max()), msg=key)
    assert json.loads((tmp_path / "answers.json").read_text()) == answers and all(answers)
    assert float(want["kl"]) > 0 and not torch.equal(want["int8"], want["logits"])


FP64 = ["model.dtype=float64", "curvature.fisher=empirical"]
KFADE = ["method=kfade", "method.solver=direct", "method.step_rule=fixed", "method.step_size=0.05",
         "method.n_steps=1", "method.max_kl_ratio=null"]


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
@pytest.mark.parametrize("overrides", [
    [*KFADE, "eval.audits=[quantize,mia,extraction]", "eval.quantize.bits=[8]"],
    [*KFADE, "experiment=mini_wmdp", "eval.lm_eval_limit=8"],  # lm-eval on the sharded models
    ["method=grad_diff", "method.retain_loss=kl", "method.epochs=1", "method.lr=1e-3"],  # a sharded frozen copy
    ["method=rmu", "method.layer=0", "method.alpha=10", "method.epochs=1", "method.lr=1e-3"],
], ids=["tofu", "wmdp", "grad_diff_kl", "rmu"])
def test_fsdp_run_scores_and_delta_equal_one_process(cache, tmp_path, overrides):
    (results, (delta, meta)), (want, (want_delta, want_meta)) = sharded_and_single(cache, tmp_path, *FP64,
                                                                                  *overrides)
    assert_same(results, want)
    assert meta["base_fingerprint"] == want_meta["base_fingerprint"] and set(delta) == set(want_delta) != set()
    for name, d in want_delta.items():
        torch.testing.assert_close(delta[name], d, rtol=1e-9, atol=1e-12 * float(d.abs().max()), msg=name)
    assert results["steps"] >= 1 and results["kl_reference/retain"] > 0


@pytest.mark.parametrize(("override", "key"), [("eval.audits=[relearn]", "eval.audits"),
                                               ("reapply.epochs=1", "reapply.epochs"),
                                               ("model.device_map=auto", "model.device_map")])
def test_what_fsdp_cannot_run_is_one_config_error(override, key):
    cfg = composed(override, "distributed.strategy=fsdp", "distributed.world_size=2", "dry_run=true")
    with pytest.raises(ConfigError, match=rf"^{key}="):
        load_config(cfg)

