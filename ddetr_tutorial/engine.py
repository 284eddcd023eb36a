"""Training and evaluation: optimizer groups, the train loop, COCO evaluation,
seeding and exact resumption.

Randomness is organised so that a run can stop anywhere and resume exactly:
the sample order of each epoch is a function of (seed, epoch), each sample's
augmentation draws from its own generator seeded by (seed, epoch, index), and
the global RNGs (dropout) are saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from .losses import total_loss

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
           "ARl")


# ----------------------------------------------------------------------------- optimizer

def param_groups(model, cfg) -> list[dict]:
    """The official groups: the backbone at lr_backbone, the sampling-offset and
    reference-point projections at lr * lr_linear_proj_mult (they move sampling
    points, and large steps there destabilise training), the rest at lr."""
    backbone, linear_proj, rest = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone.0" in name:
            backbone.append(p)
        elif "reference_points" in name or "sampling_offsets" in name:
            linear_proj.append(p)
        else:
            rest.append(p)
    groups = [{"name": "default", "params": rest, "lr": cfg.lr},
              {"name": "backbone", "params": backbone, "lr": cfg.lr_backbone},
              {"name": "linear_proj", "params": linear_proj,
               "lr": cfg.lr * cfg.lr_linear_proj_mult}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg):
    """AdamW over `param_groups`, and the StepLR schedule (x0.1 at epoch lr_drop)."""
    groups = param_groups(model, cfg)
    # The fused kernel (one pass over all tensors) is 5x faster than the per-tensor
    # loop on a CPU; it exists for CPU and CUDA tensors.
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cpu", "cuda"}
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    return optimizer, scheduler


# ----------------------------------------------------------------------------- randomness

def seed_everything(seed: int, gpus: bool = True) -> None:
    """Seed python, numpy and torch. gpus=False seeds torch's CPU generator only:
    torch.manual_seed also queues a seed for every GPU backend, with a formatted
    stack trace each time (~1/8 of a data sample's load time)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if gpus:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def rng_state() -> dict:
    """The global RNG states as plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                       "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng(seed: int):
    """Run a block on python/numpy/torch RNGs seeded with `seed`, restoring the
    caller's RNG states afterwards."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_everything(seed, gpus=False)  # the restore below covers the CPU generator alone
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededDataset(Dataset):
    """Gives each sample's augmentation its own RNG stream, a function of
    (seed, epoch, index): the result does not depend on worker count, order
    or where a run was resumed."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        with isolated_rng(sample_seed % 2**63):
            return self.dataset[index]


class EpochSampler(Sampler):
    """Indices of one epoch: a permutation from (seed, epoch) when shuffling,
    this rank's share of it (every world_size-th, padded to equal length as
    DistributedSampler does), starting after `skip` samples (mid-epoch resume)."""

    def __init__(self, size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        per_rank = math.ceil(self.size / self.world_size) if self.size else 0
        order += order[:per_rank * self.world_size - len(order)]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self):
        return max(len(self._indices()) - self.skip, 0)


def _seed_worker(worker_id: int) -> None:
    # Workers still get distinct global seeds (for code that ignores SeededDataset).
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, batch_size: int, shuffle: bool, collate_fn, seed: int = 0,
                num_workers: int = 0, rank: int = 0, world_size: int = 1, drop_last=None):
    """A DataLoader over SeededDataset(dataset) with an EpochSampler; call
    `set_epoch(loader, epoch, skip_batches)` before each epoch."""
    sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size)
    # Its own generator: creating an iterator then draws the workers' base seed
    # from it, not from the global RNG, whose sequence a resumed run must replay.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      collate_fn=collate_fn, num_workers=num_workers,
                      drop_last=shuffle if drop_last is None else drop_last,
                      worker_init_fn=_seed_worker, generator=generator)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    loader.dataset.set_epoch(epoch)
    loader.sampler.set_epoch(epoch, skip_batches * loader.batch_size)


# ----------------------------------------------------------------------------- distributed

def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initializes the
    process group (nccl on GPU, gloo on CPU) when world_size > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return rank, world_size, local_rank


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _mean_across_processes(values: dict[str, float]) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


# ----------------------------------------------------------------------------- training

def to_device(images, mask, targets, device):
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
               for t in targets]
    return images.to(device), mask.to(device), targets


def train_step(model, criterion, batch, optimizer, device, clip_max_norm=0.1,
               amp_dtype=None, scaler=None) -> dict[str, float]:
    """One optimisation step. Returns the weighted loss, each loss term and the
    gradient norm (before clipping). A non-finite loss raises FloatingPointError."""
    images, mask, targets = to_device(*batch, device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        outputs = model(images, mask)
    losses = criterion(outputs, targets)  # in float32 (the criterion upcasts)
    loss = total_loss(losses, criterion.weight_dict)
    if not torch.isfinite(loss):
        terms = {k: round(float(v.detach()), 4) for k, v in losses.items()}
        raise FloatingPointError(f"the loss is {loss.item()}; its terms: {terms}")
    optimizer.zero_grad(set_to_none=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip_max_norm if clip_max_norm > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    logs = {k: float(v.detach()) for k, v in losses.items()}
    logs.update(loss=loss.item(), grad_norm=float(norm))
    return logs


def average(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*rows) if rows else set()
    return {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in sorted(keys)}


# ----------------------------------------------------------------------------- evaluation

def coco_results(detections, image_ids, category_ids) -> list[dict]:
    """Post-processed detections -> COCO result dicts (bbox as xywh pixels)."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].tolist()
        for (x0, y0, x1, y1), score, label in zip(boxes, det["scores"].tolist(),
                                                   det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return results


def coco_eval(coco_gt, results: list[dict], image_ids=None) -> tuple[dict, str]:
    """pycocotools COCOeval (bbox) of `results` against `coco_gt`.

    Returns the 12 standard numbers by name (AP, AP50, AP75, APs, APm, APl,
    AR1, AR10, AR100, ARs, ARm, ARl; -1 where a size has no objects) and the
    printed table. No detections at all scores 0 everywhere.
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {k: 0.0 for k in METRICS}, "no detections: every metric is 0\n"
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(METRICS, (float(x) for x in evaluator.stats))), table.getvalue()


@torch.no_grad()
def predict(model, postprocess, loader, device, progress=False):
    """Run the model over a loader: yields (image_ids, detections in original pixels)."""
    from tqdm.auto import tqdm

    model.eval()
    for images, mask, targets in tqdm(loader, desc="predict", disable=not progress,
                                      leave=False):
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocess(outputs, sizes)
        yield [int(t["image_id"]) for t in targets], [{k: v.cpu() for k, v in d.items()}
                                                        for d in detections]


def evaluate(model, postprocess, loader, coco_gt, category_ids, device, progress=False):
    """COCO bbox evaluation over `loader` (sharded across processes, if any).
    Returns (metrics dict, printed table); only the main process gets the table."""
    results, seen = [], []
    for image_ids, detections in predict(model, postprocess, loader, device, progress):
        results += coco_results(detections, image_ids, category_ids)
        seen += image_ids
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, seen))
        results = [r for part, _ in gathered for r in part]
        seen = [i for _, part in gathered for i in part]
    metrics, table = coco_eval(coco_gt, results, image_ids=set(seen))
    return metrics, table


# ----------------------------------------------------------------------------- logs

def append_log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_log(log_path: Path, png_path: Path) -> None:
    """Training curves from the JSONL log: loss per epoch, and AP if evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    curves = [("training loss", ("train_loss", "train_loss_ce", "train_loss_bbox",
                                 "train_loss_giou"), ""),
              ("COCO val", ("AP", "AP50", "APs"), "o")]
    for ax, (title, keys, marker) in zip(axes, curves):
        for key in keys:  # AP only on the epochs that were evaluated (eval_every)
            points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker=marker or None, label=key.removeprefix("train_"))
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- the driver

def fit(cfg, train_set, val_set, out_dir, *, epochs=None, resume=None, seed=0, num_workers=0,
        device=None, amp=None, eval_every=1, checkpoint_every=0, keep_last=2, max_steps=None,
        progress=True, collate_fn=None, log=print):
    """Train `cfg` on `train_set`, evaluating on `val_set` (COCO datasets with `.coco`
    and `.category_ids`), writing checkpoints, `log.jsonl` and `curves.png` to
    `out_dir`. Under torchrun it trains with DistributedDataParallel and only rank
    0 writes. `resume` continues exactly from a checkpoint (also mid-epoch).
    `amp`: None, "bf16" or "fp16" (CUDA only). Returns the last evaluation's metrics.
    """
    from tqdm.auto import tqdm

    from .checkpoints import CheckpointManager, load_training_state, training_state
    from .config import build_model
    from .data import collate_fn as default_collate

    collate_fn = collate_fn or default_collate
    rank, world_size, local_rank = init_distributed()
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    amp_dtype = _amp_dtype(amp, device)
    epochs = cfg.epochs if epochs is None else epochs
    out_dir = Path(out_dir)
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(seed + rank)
    model, criterion, postprocess = build_model(cfg)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_epoch, skip, step, best = 0, 0, 0, None
    if resume is not None:
        state = load_training_state(resume, model, optimizer, scheduler, scaler)
        start_epoch, skip, step, best = (state["epoch"], state["step_in_epoch"], state["step"],
                                         state.get("best_ap"))
        set_rng_state(state["rng"])
        log(f"resumed from {resume}: epoch {start_epoch}, step {step}")
    net = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)

    train_loader = make_loader(train_set, cfg.batch_size, True, collate_fn, seed, num_workers,
                               rank, world_size)
    val_loader = make_loader(val_set, cfg.batch_size, False, collate_fn, seed, num_workers,
                             rank, world_size)
    manager = CheckpointManager(out_dir, keep_last=keep_last) if main else None

    meta = {"category_ids": list(train_set.category_ids),
            "class_names": list(getattr(train_set, "class_names", []))}

    def save(epoch, step_in_epoch, metrics=None):
        if manager is not None:
            manager.save(training_state(model, optimizer, scheduler, scaler, cfg, epoch,
                                        step_in_epoch, step, rng_state(), best, meta),
                         step=step, ap=None if metrics is None else metrics.get("AP"))

    metrics = {}
    for epoch in range(start_epoch, epochs):
        set_epoch(train_loader, epoch, skip)
        net.train()
        criterion.train()
        rows, timer = [], Timer()
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not (progress and main),
                   leave=False)
        for i, batch in enumerate(bar, start=skip):
            warm_up(optimizer, scheduler, step, cfg.warmup_steps)
            rows.append(train_step(net, criterion, batch, optimizer, device, cfg.clip_max_norm,
                                   amp_dtype, scaler))
            step += 1
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
            if max_steps is not None and step >= max_steps:
                save(epoch, i + 1)
                return metrics
            if checkpoint_every and step % checkpoint_every == 0:
                save(epoch, i + 1)
        skip = 0
        scheduler.step()
        train_logs = _mean_across_processes(average(rows))
        row = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "train_seconds": round(timer(), 2),
               **{f"train_{k}": round(v, 5) for k, v in train_logs.items()}}
        if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
            metrics, table = evaluate(model, postprocess, val_loader, val_set.coco,
                                      val_set.category_ids, device)
            row.update({k: round(v, 5) for k, v in metrics.items()})
            if main:
                log(table.rstrip())
                (out_dir / "eval.txt").write_text(f"epoch {epoch + 1}\n{table}")
                best = metrics["AP"] if best is None else max(best, metrics["AP"])
        if main:
            log(json.dumps(row))
            append_log(out_dir / "log.jsonl", row)
            plot_log(out_dir / "log.jsonl", out_dir / "curves.png")
            save(epoch + 1, 0, metrics if "AP" in row else None)
    return metrics


def warm_up(optimizer, scheduler, step: int, warmup_steps: int) -> None:
    """Scale the scheduled learning rates by (step + 1) / warmup_steps for the first
    `warmup_steps` steps (a function of the step alone, so resuming is exact)."""
    if step > warmup_steps or warmup_steps <= 0:
        return
    factor = min(1.0, (step + 1) / warmup_steps)
    # From StepLR's closed form, not the current lr, which is itself warmed up.
    decay = scheduler.gamma ** (scheduler.last_epoch // scheduler.step_size)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * decay * factor


def _amp_dtype(amp, device):
    if amp in (None, "none", "fp32"):
        return None
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if device.type != "cuda":
        raise ValueError(f"amp={amp!r} needs a CUDA device, got {device}")
    return torch.bfloat16 if amp == "bf16" else torch.float16
