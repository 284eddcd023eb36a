"""Evaluation under DDP scores exactly the saved checkpoint: evaluation shards hold
each image once (training shards stay padded), every rank evaluates rank 0's weights
and BatchNorm statistics, and the AP logged equals single-process `evaluate`."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from ddetr_tutorial import checkpoints, cli, engine
from ddetr_tutorial.coco_eval import METRICS
from ddetr_tutorial.config import build_transforms
from ddetr_tutorial.data import CocoDetection, collate_fn, make_shapes
from ddetr_tutorial.notebook import load_shipped_model
from ddetr_tutorial.reproducibility import EpochSampler, make_loader

# tiny (backbone_norm="batch") at 64 px; 4 training images give one step per rank.
SMALL = dict(image_size=64, batch_size=2, num_queries=20, num_select=20, op_backend="cpu")


def shards(size, world_size, **kw):
    return [list(EpochSampler(size, rank=rank, world_size=world_size, **kw))
            for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 4, 5, 7])
def test_evaluation_shards_hold_each_index_once(size, world_size):
    evaluation = shards(size, world_size, shuffle=False, pad=False)
    assert sorted(i for shard in evaluation for i in shard) == list(range(size))
    assert max(map(len, evaluation)) - min(map(len, evaluation)) <= 1


@pytest.mark.parametrize("size, world_size", [(5, 2), (7, 3), (8, 2)])
def test_training_shards_are_still_padded_as_distributed_sampler_pads(size, world_size):
    # Exact resume depends on this order: the (seed, epoch) permutation, sharded and
    # padded as torch's DistributedSampler shards and pads an unshuffled list.
    order = list(EpochSampler(size, True, seed=4))
    training = shards(size, world_size, shuffle=True, seed=4)
    expected = [[order[i] for i in DistributedSampler(order, world_size, rank, shuffle=False)]
                for rank in range(world_size)]
    assert training == expected
    assert {len(shard) for shard in training} == {math.ceil(size / world_size)}


def test_make_loader_pads_training_shards_only():
    data = list(range(5))
    evaluation = [list(make_loader(data, 1, False, list, rank=r, world_size=2).sampler)
                  for r in range(2)]
    assert evaluation == [[0, 2, 4], [1, 3]]
    training = [make_loader(data, 1, True, list, rank=r, world_size=2).sampler
                for r in range(2)]
    assert [len(s) for s in training] == [3, 3]


class _OneBox(torch.nn.Module):
    def forward(self, images, mask):
        return images.shape[0]


def _one_box(outputs, sizes):
    return [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "scores": torch.tensor([0.9]),
             "labels": torch.tensor([0])} for _ in range(outputs)]


def test_evaluate_refuses_an_image_predicted_twice(tmp_path):
    make_shapes(tmp_path, num_train=0, num_val=2, size=32, seed=0, max_objects=1)
    val = CocoDetection(tmp_path / "val", tmp_path / "annotations" / "instances_val.json")
    first = collate_fn([val[0]])
    engine.evaluate(_OneBox(), _one_box, [first, collate_fn([val[1]])],
                    val.coco, val.category_ids, torch.device("cpu"))  # each once: fine
    with pytest.raises(ValueError, match=r"image ids \[\d+\] more than once"):
        engine.evaluate(_OneBox(), _one_box, [first, first], val.coco, val.category_ids,
                        torch.device("cpu"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={_free_port()}", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]


def _shipped_val(root, cfg, meta):
    return CocoDetection(root / "val", root / "annotations" / "instances_val.json",
                         build_transforms(cfg, "val"), category_ids=meta["category_ids"])


def _evaluate_on_two_ranks(root, out):
    """Run by torchrun (this file as a script): rank 1's BatchNorm statistics move
    away from rank 0's, as after a DDP step on its own batch; then `evaluate`."""
    rank, world_size, _ = engine.init_distributed()
    model, cfg, postprocess, meta = load_shipped_model(device="cpu", op_backend="cpu")
    val = _shipped_val(root, cfg, meta)
    loader = make_loader(val, 2, False, collate_fn, rank=rank, world_size=world_size)
    if rank == 1:
        with torch.no_grad():
            model.train()(*collate_fn([val[i] for i in range(len(val))])[:2])
        model.eval()
    metrics, _ = engine.evaluate(model, postprocess, loader, val.coco, val.category_ids,
                                 torch.device("cpu"))
    (out / f"metrics_{rank}.json").write_text(json.dumps(metrics))


def test_every_rank_evaluates_rank_0s_model(tmp_path):
    """The shipped tiny model (BatchNorm, AP ~0.7: boxes that move when its statistics
    do) on 5 images over 2 processes scores what one process scores."""
    make_shapes(tmp_path, num_train=0, num_val=5, size=128, seed=0)
    _torchrun(__file__, tmp_path, tmp_path)
    model, cfg, postprocess, meta = load_shipped_model(device="cpu", op_backend="cpu")
    val = _shipped_val(tmp_path, cfg, meta)
    single, _ = engine.evaluate(model, postprocess, make_loader(val, 2, False, collate_fn),
                                val.coco, val.category_ids, torch.device("cpu"))
    assert single["AP"] > 0.3, single
    for rank in range(2):
        ddp = json.loads((tmp_path / f"metrics_{rank}.json").read_text())
        assert ddp == pytest.approx(single, abs=1e-6), rank


def test_ddp_ap_equals_single_process_evaluate_of_best_checkpoint(tmp_path):
    """`train` on 2 gloo processes with 5 val images (a padded shard would give rank 1
    a duplicate) and BatchNorm (each rank's running statistics differ after its last
    step): the AP logged and saved is what `evaluate` says of best.pth. One epoch
    from scratch has too low an AP to notice the statistics alone; the shipped-model
    test above does."""
    data, out = tmp_path / "data", tmp_path / "ddp"
    make_shapes(data, num_train=4, num_val=5, size=64, seed=3, max_objects=4)
    _torchrun("-m", "ddetr_tutorial", "train", "--config", "tiny", "--data", data, "--out", out,
              "--epochs", "1", "--quiet", "--set", *(f"{k}={v}" for k, v in SMALL.items()))
    (row,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    metrics_path = tmp_path / "single.json"
    assert cli.main(["evaluate", "--checkpoint", str(out / "best.pth"), "--data", str(data),
                     "--out", str(metrics_path), "--quiet"]) == 0
    single = json.loads(metrics_path.read_text())
    assert single["AP"] > 0 and single["AR100"] > 0  # else equal APs would prove nothing
    assert checkpoints.saved_best_ap(out / "best.pth") == pytest.approx(single["AP"], abs=1e-6)
    assert {k: row[k] for k in METRICS} == {k: round(single[k], 5) for k in METRICS}


if __name__ == "__main__":
    _evaluate_on_two_ranks(Path(sys.argv[1]), Path(sys.argv[2]))
