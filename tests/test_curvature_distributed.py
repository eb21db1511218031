"""Two gloo processes, each fitting on its own shard, give the single-process fit on the union."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_curvature_reference import assert_blocks_close, batches_of, dense_blocks, qa_sequences, tiny_llama

from kfade.curvature import Curvature, CurvatureConfig, fit_curvature

CFG = CurvatureConfig(estimator="ekfac", fisher="empirical")
BATCHES = batches_of(qa_sequences(7, seed=4), 3)  # batches of 3, 3, 1 sequences: uneven shards
SHARDS = [BATCHES[:2], BATCHES[2:]]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        curv = fit_curvature(tiny_llama(), SHARDS[rank], CFG)
        curv.save(f"{out_dir}/rank{rank}")
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
