"""Training checkpoints: save, rotate, resume exactly, export, and load a trained model.

A training checkpoint is plain data (tensors, numbers, strings, the config as a
dict), written atomically and read with `torch.load(weights_only=True)`: a
checkpoint is data, and unpickling arbitrary objects can run code. Official and
HuggingFace weights are read by `weights`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
from pathlib import Path

import torch

from . import __version__
from .config import Config, build_model
from .shipped import resolve_checkpoint

# ------------------------------------------------------------------------- reading files

@contextlib.contextmanager
def _namespace_allowed():
    """Let weights-only unpickling build `argparse.Namespace` (the official 'args')
    during this call only, without touching the caller's own allow-list."""
    ser = torch.serialization
    if argparse.Namespace in ser.get_safe_globals():
        yield  # the caller allowed it; our context's exit would remove it again
    elif hasattr(ser, "safe_globals"):
        with ser.safe_globals([argparse.Namespace]):
            yield
    else:  # torch 2.4 has the allow-list but not the context manager
        ser.add_safe_globals([argparse.Namespace])
        try:
            yield
        finally:
            kept = [g for g in ser.get_safe_globals() if g is not argparse.Namespace]
            ser.clear_safe_globals()
            ser.add_safe_globals(kept)


def read_torch_file(path) -> object:
    """torch.load on the CPU with weights_only=True; argparse.Namespace is allowed,
    any other pickled object is refused with an error naming it."""
    try:
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        if wanted is None:
            raise pickle.UnpicklingError(
                f"could not read {os.fspath(path)!r} as a weights-only torch checkpoint: {err}"
            ) from err
        name = wanted.group(1)
        # Never retry with weights_only=False ourselves: that would run the file's code.
        raise pickle.UnpicklingError(
            f"{os.fspath(path)!r} contains a pickled `{name}`, which weights-only loading "
            f"refuses because unpickling arbitrary objects can run code. If you trust the file, "
            f"allow that global for the call: `with torch.serialization.safe_globals([{name}]): "
            f"...load...`, or load it yourself with torch.load(path, weights_only=False) and "
            f"pass the state dict instead of the path.") from err


# ------------------------------------------------------------------ training checkpoints

def training_state(model, optimizer, scheduler, scaler, cfg, epoch: int, step_in_epoch: int,
                   step: int, rng: dict, best_ap=None, meta: dict | None = None) -> dict:
    """Everything a run needs to continue exactly, as plain data (loadable with
    weights_only=True): weights, optimizer, schedule, AMP scaler, position in the
    data (epoch, step within it, global step), RNG states, the config, versions."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step,
        "rng": rng, "best_ap": best_ap,
        "config": cfg.to_dict(),
        "meta": dict(meta or {}),
        "versions": {"ddetr_tutorial": __version__, "torch": str(torch.__version__)},
    }


def save_checkpoint(state: dict, path) -> Path:
    """Write atomically: a temporary file in the same folder, flushed to disk, then
    renamed over `path`. A crash at any point leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


class CheckpointManager:
    """Keeps `checkpoint_<step>.pth` for the last `keep_last` saves, and `best.pth`
    for the highest AP seen (never deleted by the rotation)."""

    def __init__(self, out_dir, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.out_dir, self.keep_last = Path(out_dir), keep_last
        self.best_ap = None

    def save(self, state: dict, step: int, ap=None) -> Path:
        path = save_checkpoint(state, self.out_dir / f"checkpoint_{step:08d}.pth")
        for old in sorted(self.out_dir.glob("checkpoint_*.pth"))[:-self.keep_last]:
            old.unlink()
        if ap is not None and (self.best_ap is None or ap > self.best_ap):
            self.best_ap = ap
            save_checkpoint(state, self.out_dir / "best.pth")
        return path


def latest_checkpoint(out_dir) -> Path | None:
    """The newest `checkpoint_<step>.pth` in `out_dir`, or None."""
    found = sorted(Path(out_dir).glob("checkpoint_*.pth"))
    return found[-1] if found else None


def read_training_state(path) -> dict:
    """A `training_state` dict from `path` (or an `export_model` file), checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = read_torch_file(path)
    missing = [k for k in ("model", "config", "epoch", "step") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this package (it lacks "
                         f"{missing}); for official weights use load_official_checkpoint")
    return state


def load_training_state(path, model, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Restore a `training_state` file into the given objects; returns the state
    (epoch, step_in_epoch, step, rng, best_ap, config, meta ...)."""
    state = read_training_state(path)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state


def export_model(checkpoint, path) -> Path:
    """Write the weights-only part of a training checkpoint to `path` (atomically):
    model, config, meta, epoch/step, best AP and versions; no optimizer, schedule or
    RNG state, so it is about a third the size. `load_model` reads either."""
    state = read_training_state(checkpoint)
    slim = {k: state[k] for k in ("model", "config", "epoch", "step", "best_ap", "meta",
                                  "versions") if k in state}
    slim["step_in_epoch"] = state.get("step_in_epoch", 0)
    return save_checkpoint(slim, path)


def load_model(path, device=None, **overrides):
    """A trained model from a training checkpoint (a path or a shipped name), in eval mode.
    Returns (model, cfg, postprocess, meta); `overrides` change config fields
    that do not alter the weights (e.g. op_backend)."""
    state = read_training_state(resolve_checkpoint(path))
    cfg = Config(**state["config"]).replace(pretrained_backbone=None, **overrides)
    model, _, postprocess = build_model(cfg)
    model.load_state_dict(state["model"])
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, cfg, postprocess, state.get("meta", {})
