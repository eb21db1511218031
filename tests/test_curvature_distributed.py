"""Two gloo processes, each fitting on its own shard, give the single-process fit on the union; Gauss-Newton
products over the same batches (each rank its shard, all-reduced) equal the single-process product."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_curvature_reference import assert_blocks_close, batches_of, dense_blocks, qa_sequences, tiny_llama

from kfade.curvature import Curvature, CurvatureConfig, GaussNewton, fit_curvature

CFG = CurvatureConfig(estimator="ekfac", fisher="empirical")
BATCHES = batches_of(qa_sequences(7, seed=4), 3)  # batches of 3, 3, 1 sequences: uneven shards
SHARDS = [BATCHES[:2], BATCHES[2:]]


def ggn_inputs(model):
    names = [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")]
    g = torch.Generator().manual_seed(3)
    params = dict(model.named_parameters())
    return names, {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in names}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        curv = fit_curvature(tiny_llama(), SHARDS[rank], CFG)
        curv.save(f"{out_dir}/rank{rank}")
        model = tiny_llama()
        names, v = ggn_inputs(model)
        ggn = GaussNewton(model, BATCHES, names)  # the full list: the operator shards it itself
        product = ggn(v)
        save_file({**product, "n_tokens": torch.tensor(ggn.n_tokens), "local": torch.tensor(len(ggn.batches))},
                  f"{out_dir}/ggn{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_union(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = fit_curvature(tiny_llama(), BATCHES, CFG)
    reference = dense_blocks(single)
    for rank in range(2):
        fitted = Curvature.load(tmp_path / f"rank{rank}")
        assert fitted.n_tokens == single.n_tokens and fitted.n_positions == single.n_positions
        assert_blocks_close(dense_blocks(fitted), reference, rtol=1e-9)
    model = tiny_llama()
    names, v = ggn_inputs(model)
    ggn = GaussNewton(model, BATCHES, names)
    want = ggn(v)
    for rank in range(2):
        got = load_file(tmp_path / f"ggn{rank}.safetensors")
        assert int(got.pop("n_tokens")) == ggn.n_tokens and int(got.pop("local")) == (2, 1)[rank]
        for n in names:
            torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14 * float(want[n].abs().max()))
