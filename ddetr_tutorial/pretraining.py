"""Backbone pretraining in miniature: the paper's ImageNet step, on synthetic classification.

Deformable DETR starts from an ImageNet-pretrained ResNet-50. Here the same
`backbone.ResNet` the detector uses learns to classify the single object of a
`data.classification` image (20 classes): ResNet body -> global average pool
of C5 -> linear classifier, trainable BatchNorm, AdamW (or SGD), a
cosine schedule, flips / right-angle rotations / shifts. It stops cleanly at a
wall-clock budget, and the schedule anneals by whichever ends first, the steps
or the budget. The weights are written in torchvision's ResNet layout
(`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`, ..., `fc.*`), which
`backbone.load_resnet_weights` reads, with a card (JSON and Markdown) beside them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbone import resnet, unfreeze_batch_norm
from .data.classification import CLASS_NAMES, classification_key, make_classification
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


class ResNetClassifier(nn.Module):
    """ResNet body + global average pool + fc: images (N, 3, H, W) -> logits (N, classes).

    The body is `backbone.resnet(name, width=width)` with trainable BatchNorm2d, so
    its keys are the detector backbone's (`conv1.weight`, `layer1.0.bn1.running_mean`...).
    """

    def __init__(self, name: str = "resnet18", width: int = 32,
                 num_classes: int = len(CLASS_NAMES)):
        super().__init__()
        self.body = unfreeze_batch_norm(resnet(name, width=width))
        self.fc = nn.Linear(self.body.num_channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c5 = self.body(images)[-1]  # (N, 8 * width * expansion, H/32, W/32)
        return self.fc(c5.mean(dim=(2, 3)))


def torchvision_state_dict(model: ResNetClassifier) -> dict:
    """The classifier's weights as torchvision names them: body keys unprefixed, plus fc.*."""
    state = {k: v.detach().cpu().clone() for k, v in model.body.state_dict().items()}
    state.update({f"fc.{k}": v.detach().cpu().clone() for k, v in model.fc.state_dict().items()})
    return state


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W), normalized as the detector's inputs are."""
    x = pixels.permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip, right-angle rotation and a shift of up to `shift` px per
    image: (N, 3, H, W) -> (N, 3, H, W). Every class is drawn at any angle, so these
    keep labels."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    turns = torch.randint(0, 4, (n,), generator=generator)
    if h == w:
        x = torch.stack([torch.rot90(img, int(k), (1, 2)) for img, k in zip(x, turns)])
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def evaluate(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256, device="cpu") -> dict:
    """Top-1 accuracy and mean cross entropy on a held-out set, plus top-1 per class."""
    model.eval()
    losses, predictions = [], []
    for i in range(0, len(labels), batch_size):
        logits = model(to_input(pixels[i:i + batch_size]).to(device)).float().cpu()
        losses.append(F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum"))
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions)
    correct = (predicted == labels).float()
    per_class = {int(c): float(correct[labels == c].mean()) for c in labels.unique()}
    return {"top1": float(correct.mean()), "loss": float(torch.stack(losses).sum()) / len(labels),
            "per_class": per_class}


def cosine_lr(base: float, progress: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of progress, then cosine from `base` to 0."""
    if progress < warmup:
        return base * (progress + 1e-3) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def machine_info() -> dict:
    """CPU model, cores, torch's threads and versions, for the card."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def pretrain(out, *, backbone: str = "resnet18", width: int = 32, image_size: int = 64,
             num_train: int = 20000, num_val: int = 2000, classes=None, epochs: int = 100,
             batch_size: int = 64, optimizer: str = "adamw", lr: float = 2e-3,
             weight_decay: float = 0.05, label_smoothing: float = 0.0,
             budget_min: float | None = 30.0, seed: int = 0, threads: int | None = None,
             device: str = "cpu", half: bool = True, command: str | None = None,
             log=print) -> dict:
    """Pretrain `backbone` on synthetic classification; write `out` (torchvision-layout
    weights), `out.json` (the full record) and `out.md` (the card). Returns the record.

    `classes`: class indices to use (default all 20). The budget (minutes, from the
    call, data generation included) ends training with one last held-out evaluation.
    `half`: store the weights in float16 (`store_half`: half the file, top-1 re-measured).
    """
    _check_args(num_train, num_val, epochs, batch_size, lr, budget_min)
    previous = torch.get_num_threads()
    if threads is not None:  # for this call only
        torch.set_num_threads(threads)
    try:
        return _pretrain(Path(out), backbone, width, image_size, num_train, num_val, classes,
                         epochs, batch_size, optimizer, lr, weight_decay, label_smoothing,
                         budget_min, seed, device, command, log, half)
    finally:
        torch.set_num_threads(previous)


def _pretrain(out, backbone, width, image_size, num_train, num_val, classes, epochs,
              batch_size, optimizer, lr, weight_decay, label_smoothing, budget_min, seed,
              device, command, log, half) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(CLASS_NAMES) if classes is None else [CLASS_NAMES[k] for k in sorted(classes)]
    train_px, train_y = _split(num_train, image_size, seed, "train", classes)
    val_px, val_y = _split(num_val, image_size, seed, "val", classes)
    data_s = time.perf_counter() - start
    log(f"data: {num_train} + {num_val} images of {image_size} px, {len(names)} classes, "
        f"in {data_s:.0f} s")

    model = ResNetClassifier(backbone, width, len(names)).to(device)
    opt = _optimizer(optimizer, _param_groups(model, weight_decay), lr)
    eval_start = time.perf_counter()
    history = [{"epoch": 0, **_summary(evaluate(model, val_px, val_y, device=device))}]
    eval_s = time.perf_counter() - eval_start
    deadline = math.inf if budget_min is None else start + 60 * budget_min - 2 * eval_s - 2
    log(f"epoch 0 (untrained): held-out top-1 {history[0]['top1']:.3f}")
    state = _train(model, opt, train_px, train_y, val_px, val_y, history, epochs=epochs,
                   batch_size=batch_size, lr=lr, label_smoothing=label_smoothing,
                   deadline=deadline, seed=seed, device=device, log=log)
    final = evaluate(model, val_px, val_y, device=device)
    torch.save(torchvision_state_dict(model), out)
    record = {
        "command": command, "weights": out.name, "backbone": backbone, "width": width,
        "data": {"generator": "ddetr_tutorial.data.classification", "classes": names,
                 "image_size": image_size, "num_train": num_train, "num_val": num_val,
                 "seed": seed, "train_key": classification_key(seed, "train", 0)[:1]
                 + ["index", *classification_key(seed, "train", 0)[2:]],
                 "val_key": classification_key(seed, "val", 0)[:1]
                 + ["index", *classification_key(seed, "val", 0)[2:]]},
        "recipe": {"epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "weight_decay": weight_decay, "label_smoothing": label_smoothing,
                   "optimizer": {"sgd": "SGD, Nesterov momentum 0.9",
                                 "adamw": "AdamW"}[optimizer],
                   "schedule": "linear warm-up, cosine to 0 by steps or budget",
                   "augment": "hflip, rot90, shift 4 px", "budget_min": budget_min},
        "epochs_done": state["epochs_done"], "steps": state["steps"],
        "stopped_by": state["stopped_by"], "data_minutes": round(data_s / 60, 2),
        "minutes": round((time.perf_counter() - start) / 60, 2), "machine": machine_info(),
        "chance_top1": 1 / len(names), "top1": final["top1"], "val_loss": final["loss"],
        "best_top1": max(h["top1"] for h in history),
        "per_class_top1": {names[k]: round(v, 4) for k, v in final["per_class"].items()},
        "history": history,
    }
    _write_record(out, record)
    if half:
        record = store_half(out)
    log(f"held-out top-1 {record['top1']:.3f} (chance {record['chance_top1']:.3f}) after "
        f"{record['epochs_done']} epochs, {record['minutes']:.1f} min; wrote {out}")
    return record


def store_half(out) -> dict:
    """Rewrite the weights at `out` in float16 and re-measure the held-out top-1 with
    exactly those weights (loaded back into float32), updating `out.json` and `out.md`.

    Half the file of float32; BatchNorm statistics and filters keep 3 significant
    digits, which the re-measured top-1 (beside `top1_float32`) shows is enough.
    """
    out = Path(out)
    record = json.loads(out.with_suffix(".json").read_text())
    state = torch.load(out, map_location="cpu", weights_only=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    d = record["data"]
    classes = [CLASS_NAMES.index(n) for n in d["classes"]]
    model = ResNetClassifier(record["backbone"], record["width"], len(classes))
    model.body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    model.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    val_px, val_y = _split(d["num_val"], d["image_size"], d["seed"], "val",
                           None if len(classes) == len(CLASS_NAMES) else classes)
    result = evaluate(model, val_px, val_y)
    torch.save(state, out)
    record.update({"storage": "float16", "top1_float32": record.get("top1_float32",
                                                                    record["top1"]),
                   "top1": result["top1"], "val_loss": result["loss"],
                   "per_class_top1": {d["classes"][k]: round(v, 4)
                                      for k, v in result["per_class"].items()}})
    _write_record(out, record)
    return record


def _write_record(out: Path, record: dict) -> None:
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    out.with_suffix(".md").write_text(model_card(record))


def _check_args(num_train, num_val, epochs, batch_size, lr, budget_min) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("epochs", epochs),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if budget_min is not None and not budget_min > 0:
        raise ValueError(f"budget_min must be > 0 minutes (or None), got {budget_min!r}")


def _split(count, size, seed, split, classes):
    pixels, labels = make_classification(count, size, seed, split, labels=classes)
    if classes is not None:  # class indices -> 0..k-1 in the order of `classes`
        labels = np.searchsorted(np.array(sorted(set(classes))), labels)
    return torch.from_numpy(pixels), torch.from_numpy(labels)


def _optimizer(name: str, groups: list, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def _param_groups(model: nn.Module, weight_decay: float) -> list:
    # No weight decay on BatchNorm terms and biases, as is usual for ResNets.
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _train(model, optimizer, train_px, train_y, val_px, val_y, history, *, epochs, batch_size,
           lr, label_smoothing, deadline, seed, device, log) -> dict:
    """The epoch loop; appends one held-out evaluation per epoch to `history`."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(train_y) // batch_size)  # full batches only: BatchNorm
    total = epochs * per_epoch
    warmup = min(0.05, 1 / epochs)
    t0, step, stopped_by = time.perf_counter(), 0, "epochs"
    budget_s = deadline - t0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        losses = []
        for b in range(per_epoch):
            now = time.perf_counter()
            if now >= deadline:
                stopped_by = "budget"
                break
            progress = max(step / total, (now - t0) / budget_s)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, progress, warmup)
            index = order[b * batch_size:(b + 1) * batch_size]
            images = augment(to_input(train_px[index]), generator).to(device)
            loss = F.cross_entropy(model(images), train_y[index].to(device),
                                   label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        if not losses:
            break
        result = _summary(evaluate(model, val_px, val_y, device=device))
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        "steps": len(losses), "lr": optimizer.param_groups[0]["lr"],
                        "minutes": round((time.perf_counter() - t0) / 60, 2), **result})
        log(f"epoch {epoch}: train loss {history[-1]['train_loss']:.3f}, held-out top-1 "
            f"{result['top1']:.3f}, loss {result['loss']:.3f}, {history[-1]['minutes']:.1f} min")
        if stopped_by == "budget":
            break
    epochs_done = sum(1 for h in history if h["epoch"] > 0)
    return {"epochs_done": epochs_done, "steps": step, "stopped_by": stopped_by}


def _summary(result: dict) -> dict:
    return {"top1": round(result["top1"], 4), "loss": round(result["loss"], 4)}


def model_card(record: dict) -> str:
    """The Markdown card of a pretraining record."""
    d, m = record["data"], record["machine"]
    curve = ", ".join(f"{h['epoch']}: {h['top1']:.3f}" for h in record["history"])
    return "\n".join([
        f"# {Path(record['weights']).stem}: a {record['backbone']} (width {record['width']}) "
        f"pretrained on synthetic classification",
        "",
        "The detector's backbone, pretrained the way the paper's ImageNet step does it, in "
        "miniature: torchvision ResNet keys (`conv1.weight`, ..., `fc.*`), read by "
        "`backbone.load_resnet_weights` (which drops `fc.*`).",
        "",
        f"- **Held-out top-1: {record['top1']:.3f}** on {d['num_val']} val images "
        f"(chance {record['chance_top1']:.3f}; best epoch {record['best_top1']:.3f})"
        + (f", with the stored {record['storage']} weights (float32: "
           f"{record['top1_float32']:.3f})" if "storage" in record else ""),
        f"- Command: `{record['command'] or 'pretrain(...)'}`",
        f"- Data: `{d['generator']}`, {len(d['classes'])} classes ({', '.join(d['classes'])}), "
        f"{d['image_size']} px, {d['num_train']} train + {d['num_val']} val images generated "
        f"in memory, seed {d['seed']}; rng keys {d['train_key']} (train) and {d['val_key']} "
        "(val), disjoint from every detection (`shapes`) key",
        f"- Recipe: {json.dumps(record['recipe'])}",
        f"- Time: {record['minutes']} min in all ({record['data_minutes']} min making data), "
        f"{record['epochs_done']} epochs, {record['steps']} steps, stopped by "
        f"{record['stopped_by']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
        f"torch {m['torch']}, Python {m['python']}" + (f", {m['gpu']}" if "gpu" in m else ""),
        f"- Held-out top-1 by epoch: {curve}",
        "- Per-class top-1: " + ", ".join(f"{k} {v:.2f}"
                                          for k, v in record["per_class_top1"].items()),
        *([f"- Note: {record['note']}"] if record.get("note") else []),
        "",
        f"The full record (per-epoch losses too) is `{Path(record['weights']).stem}.json`.",
        "",
    ])


__all__ = ["ResNetClassifier", "torchvision_state_dict", "to_input", "augment", "evaluate",
           "cosine_lr", "machine_info", "pretrain", "store_half", "model_card"]
