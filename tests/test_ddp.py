"""DDP (``trainer=ddp``): two CPU processes (gloo) give the one-process run of the same global batch.

The samplers first (every rank's share, in the one-process order), then the real command line: the in-step
saliency's double backward under DDP, the metrics synced over the ranks, each test image counted once, the
test predictions gathered in loader order, and rank 0 alone writing the run files.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trustcnn.callbacks import epoch_seed
from trustcnn.data.samplers import EpochShuffleSampler, ShardSampler, interleave_shards
from trustcnn.train import train

# ---------------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("n", [96, 101])
def test_rank_shards_of_the_training_order_make_the_one_process_batches(n: int) -> None:
    per_rank, world = 8, 2
    one = EpochShuffleSampler(n, seed=3)
    ranks = [EpochShuffleSampler(n, seed=3, rank=r, world_size=world) for r in range(world)]
    orders = []
    for epoch in (0, 1, 5):  # set_epoch reaches the order on every rank alike
        for s in (one, *ranks):
            s.set_epoch(epoch)
        orders.append(list(one))
        assert len({len(s) for s in ranks}) == 1  # same number of steps on every rank (no DDP hang)
        one_batches = list(DataLoader(TensorDataset(torch.arange(n)), batch_size=world * per_rank, sampler=one))
        rank_batches = [list(DataLoader(TensorDataset(torch.arange(n)), batch_size=per_rank, sampler=s)) for s in ranks]
        full = n // (world * per_rank)  # whole global batches
        for k in range(full):
            union = sorted(torch.cat([rb[k][0] for rb in rank_batches]).tolist())
            assert union == sorted(one_batches[k][0].tolist())
        # the padded tail repeats the start of the order, and only when n is not a multiple of world
        seen = [i for s in ranks for i in s]
        assert sorted(set(seen)) == list(range(n)) and len(seen) == n + (-n) % world
        assert sorted(i for i in set(seen) if seen.count(i) > 1) == sorted(orders[-1][: (-n) % world])
    assert orders[0] != orders[1] != orders[2]
    # one process: the order it always had (resumed runs and cached pretrained networks depend on it)
    assert orders[0] == torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(3, 0))).tolist()


def test_evaluation_shards_count_each_image_once_and_interleave_back() -> None:
    n, world = 359, 2
    shards = [list(ShardSampler(n, r, world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # no padding, no duplicate
    values = torch.arange(n) * 10
    assert torch.equal(interleave_shards([values[s] for s in shards]), values)
    # a first-k-batches limit keeps a prefix of each shard, which interleaves to a prefix of the set
    assert torch.equal(interleave_shards([values[s][:32] for s in shards]), values[:64])
    with pytest.raises(ValueError, match="not a ShardSampler"):
        interleave_shards([values[shards[0]][:32], values[shards[1]][:30]])
    with pytest.raises(ValueError, match="at least one"):
        ShardSampler(1, 1, 2)


def test_lightning_leaves_our_samplers_alone() -> None:
    """With use_distributed_sampler=true (plain `trainer.strategy=ddp`) Lightning must not shard them again."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         use_distributed_sampler=True)
    ds = TensorDataset(torch.arange(10))
    for sampler in (EpochShuffleSampler(10, 0, 1, 2), ShardSampler(10, 1, 2)):
        assert not trainer._data_connector._requires_distributed_sampler(DataLoader(ds, sampler=sampler))


# ---------------------------------------------------------------------------------------------------
# the real run: DDP on 2 CPU processes = 1 process with the same global batch

PER_RANK_BATCH = 16
SHARED = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=null",
          "trainer.limit_test_batches=null", "model.pretrain.epochs=1", "trainer.enable_progress_bar=false",
          "trainer.accelerator=cpu", "grid_images=4", "test_checkpoint=last"]
# the decoy-digits splits: 360 validation and 359 test images, so the two ranks get 180 + 179 test images
TEST_IMAGES = 359
COMPARED = ("acc", "precision", "recall", "pointing_game", "energy_pointing_game", "energy_pointing_game_uniform",
            "s_hat", "decoy_following_rate", "decoy_conflicts",
            *(f"case{c}_{part}" for c in range(1, 5) for part in ("count", "fraction", "ci_low", "ci_high")))


def _epoch_row(run_dir: Path) -> dict[str, float]:
    """The epoch-level values of the run's CSV log (train/*_epoch, val/*), merged over its rows."""
    merged: dict[str, float] = {}
    for row in csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()):
        merged.update({k: float(v) for k, v in row.items() if v and (k.startswith("val/") or k.endswith("_epoch"))})
    return merged


def test_ddp_two_cpu_processes_equal_one_process(tmp_path: Path, cache_dir: Path, make_cfg) -> None:
    # two processes with 16 images each (in the background) ...
    started = time.perf_counter()
    env = {**os.environ, "WANDB_MODE": "offline", "PROJECT_ROOT": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "trustcnn.train", "trainer=ddp", "trainer.devices=2",
                             f"data.batch_size={PER_RANK_BATCH}", *SHARED, f"paths.cache_dir={cache_dir}"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # ... and one process with 32, meanwhile (the same cached pretrained network: its batch is the global one)
    cfg = make_cfg(f"data.batch_size={2 * PER_RANK_BATCH}", "test_checkpoint=last", output="one")
    cfg.trainer.limit_val_batches = cfg.trainer.limit_test_batches = None  # shrink's limits, made SHARED's
    _, objects = train(cfg)
    one_dir = Path(cfg.paths.output_dir)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    ddp = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    ddp_seconds = time.perf_counter() - started
    runs = list((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the second rank joined the first one's run directory
    ddp_dir = runs[0]
    # it really ran on 2 processes (Lightning logs through Hydra's handlers, to stdout, since trustcnn.cli imports
    # Lightning only once the job runs)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in ddp.stdout + ddp.stderr
    assert ddp.stdout.count("Final metrics") == 1  # rank 0 alone reports (and writes)
    assert not (ddp_dir / "error.json").exists()
    assert (ddp_dir / "saliency_grid.png").stat().st_size > 1000

    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    one_metrics = json.loads((one_dir / "metrics.json").read_text())
    assert ddp_metrics.keys() == one_metrics.keys()
    assert ddp_metrics["tested_step"] == one_metrics["tested_step"] == 3  # the same number of optimizer steps
    for test_set in ("test", "test_consistent"):
        counted = sum(ddp_metrics[f"{test_set}/case{c}_count"] for c in range(1, 5))
        assert counted == TEST_IMAGES, test_set  # every test image once: none left out, none repeated
        for name in COMPARED:
            key = f"{test_set}/{name}"
            if key in one_metrics:
                assert ddp_metrics[key] == pytest.approx(one_metrics[key], rel=1e-4, abs=1e-6), key
    for key in one_metrics:  # the tested checkpoint's validation values and the bookkeeping too
        assert ddp_metrics[key] == pytest.approx(one_metrics[key], rel=1e-4, abs=1e-6), key
    # epoch means of plain logged tensors (loss terms) are synced, weighted by each rank's image count
    ddp_epoch, one_epoch = _epoch_row(ddp_dir), _epoch_row(one_dir)
    assert "train/loss_epoch" in one_epoch and "val/loss" in one_epoch
    for key, value in one_epoch.items():
        assert ddp_epoch[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    # the trained layer's weights after the double backward through DDP; frozen ones unchanged
    a = torch.load(ddp_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(one_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 3
    pretrained = torch.load(objects["pretrained"], weights_only=True)
    trained = [k for k in b["state_dict"] if k.startswith("net.features.conv3.")]
    assert trained and all(not torch.equal(b["state_dict"][k], pretrained[k[len("net."):]]) for k in trained)
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    print(f"both runs: {ddp_seconds:.1f} s")  # noqa: T201 - shown with -s, for the timing notes


def test_ddp_inside_a_multirun_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    """Lightning starts the other ranks by re-running the command line: inside `-m` they would re-run the sweep."""
    sweep = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "trustcnn.train", "-m", "trainer=ddp", "trainer.accelerator=cpu",
                             "seed=0", f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}"],
                            cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                            timeout=300)
    error = json.loads((sweep / "0" / "error.json").read_text())["error"]
    assert "cannot run inside a multirun" in error, result.stderr[-3000:]
    assert not (sweep / "0" / "checkpoints").exists()  # refused before any training
