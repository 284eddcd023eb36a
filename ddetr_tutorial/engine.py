"""Training and evaluation: optimizer groups, the train step, the evaluation loop,
logs and `fit`, the driver that ties them together.

COCO scoring lives in `coco_eval`, the resumable data order and RNG state in
`reproducibility`, checkpoint files in `checkpoints`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .checkpoints import (
    CheckpointManager,
    read_training_state,
    restore_training_state,
    saved_best_ap,
    training_state,
)
from .coco_eval import coco_eval, coco_results
from .config import build_model
from .data import collate_fn as default_collate
from .losses import total_loss
from .model_files import init_from as init_weights
from .reproducibility import make_loader, rng_state, seed_everything, set_epoch, set_rng_state

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


def broadcast_from_main(model) -> None:
    """Copy rank 0's parameters and buffers into `model` on every process, in place
    (nothing to do outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    # DDP keeps the parameters equal, but not the buffers: it broadcasts rank 0's
    # BatchNorm running statistics before each forward, and each rank's forward then
    # updates its copy from its own batch, so after the last step they differ.
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor.detach(), src=0)


def _agreed(flag: bool, device) -> bool:
    """Rank 0's `flag` on every process (so all stop at the same epoch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


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
        # DN (denoising) models also read the targets: their dn queries are noised ones.
        if getattr(getattr(model, "module", model), "uses_targets", False):
            outputs = model(images, mask, targets=targets)
        else:
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

@torch.no_grad()
def predict(model, postprocess, loader, device, progress=False):
    """Run the model over a loader: yields (image_ids, detections in original pixels)."""
    model.eval()
    for images, mask, targets in tqdm(loader, desc="predict", disable=not progress,
                                      leave=False):
        outputs = model(images.to(device), mask.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = postprocess(outputs, sizes)
        yield [int(t["image_id"]) for t in targets], [{k: v.cpu() for k, v in d.items()}
                                                        for d in detections]


def evaluate(model, postprocess, loader, coco_gt, category_ids, device, progress=False):
    """COCO bbox evaluation over `loader`. Under torchrun, each process predicts its
    shard with rank 0's weights and buffers (which it copies first: the weights a
    checkpoint saves), and the shards must hold each image once (`make_loader` with
    shuffle=False). Returns (metrics dict, printed table), the same on every process."""
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        broadcast_from_main(model)
    results, seen = [], []
    for image_ids, detections in predict(model, postprocess, loader, device, progress):
        results += coco_results(detections, image_ids, category_ids)
        seen += image_ids
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (results, seen))
        results = [r for part, _ in gathered for r in part]
        seen = [i for _, part in gathered for i in part]
    _check_each_image_once(seen)
    metrics, table = coco_eval(coco_gt, results, image_ids=set(seen))
    return metrics, table


def _check_each_image_once(image_ids: list[int]) -> None:
    # COCOeval would score a repeated image's detections twice (a padded sampler).
    repeated = sorted(i for i, n in Counter(image_ids).items() if n > 1)
    if repeated:
        raise ValueError(f"evaluation predicted image ids {repeated[:10]} more than once; "
                         "the loader (or its shards across processes) must hold each image "
                         "once, e.g. make_loader(..., shuffle=False)")


# ----------------------------------------------------------------------------- logs

def append_log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot_log(log_path: Path, png_path: Path) -> None:
    """Training curves from the JSONL log: loss per epoch, and AP if evaluated."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line]
    if not rows:
        return
    # A bare Figure draws with the Agg canvas and leaves pyplot's backend and its
    # list of open figures (a notebook's) untouched.
    fig = Figure(figsize=(9, 3.2))
    axes = fig.subplots(1, 2)
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


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


# ----------------------------------------------------------------------------- the driver

def fit(cfg, train_set, val_set, out_dir, *, epochs=None, resume=None, seed=0, num_workers=0,
        device=None, amp=None, eval_every=1, checkpoint_every=0, keep_last=2, max_steps=None,
        progress=True, collate_fn=None, log=print, init_from=None, budget_min=None):
    """Train `cfg` on `train_set`, evaluating on `val_set` (COCO datasets with `.coco`
    and `.category_ids`), writing checkpoints, `log.jsonl` and `curves.png` to
    `out_dir`. Under torchrun it trains with DistributedDataParallel and only rank
    0 writes. `resume` continues exactly from a checkpoint (also mid-epoch).
    `amp`: None, "bf16" or "fp16" (CUDA only). `init_from`: fine-tune from any
    checkpoint (a path or a `model_files.ModelFile`; see `model_files.init_from`).
    `budget_min`: stop, checkpointed, before an epoch that would end past this many
    minutes (judged by the last epoch's duration); resume to continue.
    Returns the last evaluation's metrics.
    """
    collate_fn = collate_fn or default_collate
    rank, world_size, local_rank = init_distributed()
    check_dataset_sizes(train_set, val_set, cfg.batch_size, world_size)
    out_dir = Path(out_dir)
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    state = None
    if resume is not None:  # read (and refuse a bad file) before any work
        state = read_training_state(resume)
        cfg = resume_config(cfg, state["config"])
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    amp_dtype = _amp_dtype(amp, device)
    epochs = cfg.epochs if epochs is None else epochs

    seed_everything(seed + rank)
    model, criterion, postprocess = build_model(cfg)
    if init_from is not None and state is None:
        report = init_weights(model, init_from)  # every rank: DDP checks equal shapes
        if main:
            log(str(report))
    elif init_from is not None and main:
        log("init_from ignored: the resumed checkpoint's weights are restored")
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    start_epoch, skip, step, best = 0, 0, 0, None
    if state is not None:
        restore_training_state(state, model, optimizer, scheduler, scaler)
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
    manager = None
    if main:  # a resumed run's best.pth is replaced only by a better AP
        manager = CheckpointManager(out_dir, keep_last=keep_last, best_ap=saved_best_ap(
            out_dir / "best.pth") if state is not None else None)

    meta = {"category_ids": list(train_set.category_ids),
            "class_names": list(getattr(train_set, "class_names", []))}

    def save(epoch, step_in_epoch, metrics=None):
        if manager is not None:
            manager.save(training_state(model, optimizer, scheduler, scaler, cfg, epoch,
                                        step_in_epoch, step, rng_state(), best, meta),
                         step=step, ap=None if metrics is None else metrics.get("AP"))

    metrics = {}
    started, last_epoch = time.monotonic(), 0.0
    for epoch in range(start_epoch, epochs):
        epoch_started = time.monotonic()
        if budget_min is not None and _agreed(epoch_started + last_epoch
                                              > started + 60 * budget_min, device):
            if main:
                log(f"stopped before epoch {epoch + 1}/{epochs}: the next epoch would end past "
                    f"--budget-min {budget_min:g}; continue with --resume {out_dir}")
            return metrics
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
        last_epoch = time.monotonic() - epoch_started
    return metrics


def check_dataset_sizes(train_set, val_set, batch_size: int, world_size: int = 1) -> None:
    """Refuse, before any work, a training set that would give no step: each of the
    world_size ranks gets ceil(N / world_size) images and drops its last partial
    batch. An empty validation set is refused too (nothing to score)."""
    n = len(train_set)
    per_rank = math.ceil(n / world_size) if n else 0
    if per_rank < batch_size:
        raise ValueError(
            f"the training set has {n} images: {per_rank} per process for {world_size} "
            f"process(es), fewer than batch_size={batch_size}, so an epoch would have no "
            f"step (the last partial batch is dropped); use more images or a smaller "
            f"--set batch_size")
    if len(val_set) == 0:
        raise ValueError("the validation set has 0 images; evaluation needs at least one")


# Config fields the saved optimizer / schedule state overrides on resume.
RESTORED_BY_STATE = ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay", "lr_drop")
# Fields a resumed run may change freely (more epochs, another kernel, fewer detections).
SAFE_ON_RESUME = ("epochs", "op_backend", "num_select", "pretrained_backbone")


class ResumeWarning(UserWarning):
    """A config change that --resume ignores, or that breaks exact continuation."""


def resume_config(cfg, saved: dict):
    """`cfg` for a run resumed from a checkpoint whose config is `saved`: fields the
    saved optimizer / schedule state restores take their saved values (so the new
    checkpoints say what was used), with a warning; other unsafe changes are kept,
    with a warning that the run is no longer an exact continuation."""
    ours = cfg.to_dict()
    changed = {k: v for k, v in ours.items() if k in saved and saved[k] != v}
    ignored = {k: saved[k] for k in changed if k in RESTORED_BY_STATE}
    if ignored:
        warnings.warn(", ".join(f"{k}={changed[k]!r}" for k in ignored) + " ignored on resume: "
                      "the checkpoint's optimizer and schedule state restore "
                      + ", ".join(f"{k}={v!r}" for k, v in ignored.items()),
                      ResumeWarning, stacklevel=3)
    unsafe = [k for k in changed if k not in ignored and k not in SAFE_ON_RESUME]
    if unsafe:
        warnings.warn("resuming with a config that differs from the checkpoint's in "
                      + ", ".join(f"{k} ({saved[k]!r} -> {changed[k]!r})" for k in unsafe)
                      + ": the run is no longer an exact continuation", ResumeWarning,
                      stacklevel=3)
    return cfg.replace(**ignored) if ignored else cfg


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
