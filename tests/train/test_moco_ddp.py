"""Two gloo processes: keys from uneven per-rank batches are gathered so both ranks hold one queue."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from safetensors.torch import save_file

    from astrea.train.moco import MoCoConfig, sample_ids

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        moco = MoCoConfig(embed_dim=2, queue_size=6).build(visual_dim=4, text_dim=4)
        sizes = {0: [3, 1, 0, 2], 1: [1, 0, 0, 2]}[rank]  # uneven, empty on one rank and on all, wrap-around
        for step, b in enumerate(sizes):
            base = 100 * rank + 10 * min(step, 2)
            k = torch.arange(base, base + b, dtype=torch.float32)[:, None].repeat(1, 2)
            moco.enqueue(k, -k, sample_ids([f"{rank}-{step}-{i}" for i in range(b)]))
        save_file({k: v.contiguous() for k, v in moco.state_dict().items() if k.startswith("queue")},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_queues_identical_across_ranks(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    q0 = load_file(str(tmp_path / "rank0.safetensors"))
    q1 = load_file(str(tmp_path / "rank1.safetensors"))
    for k in q0:
        assert torch.equal(q0[k], q1[k]), k
    # steps gather 0,1,2,100 | 10 | 20,21,120,121 (rank order): 9 keys in a ring of 6 keep the newest 6
    assert int(q0["queue_filled"]) == 6 and int(q0["queue_ptr"]) == 9 % 6
    assert sorted(q0["queue_t"][:, 0].tolist()) == sorted([100.0, 10.0, 20.0, 21.0, 120.0, 121.0])
    torch.testing.assert_close(q0["queue_v"], -q0["queue_t"])
