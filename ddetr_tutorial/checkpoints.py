"""Training checkpoints: save atomically, rotate, keep the best, and resume exactly.

A training checkpoint is plain data (tensors, numbers, strings, the config as a
dict), written atomically and read with `torch.load(weights_only=True)`: a
checkpoint is data, and unpickling arbitrary objects can run code. Official and
HuggingFace weights are read by `weights`; `model_files` reads, loads and
exports a checkpoint of any kind.
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


class NotACheckpointError(ValueError):
    """The file is empty, truncated, or not a torch file at all."""


def _not_a_checkpoint(path, err) -> NotACheckpointError:
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    detail = str(err).split(". ")[0].splitlines()[0][:100] if str(err).strip() else ""
    return NotACheckpointError(f"{os.fspath(path)} is not a checkpoint (truncated? {size} "
                               f"bytes; torch.load: {type(err).__name__}"
                               + (f": {detail})" if detail else ")"))


def read_torch_file(path) -> object:
    """torch.load on the CPU with weights_only=True; argparse.Namespace is allowed,
    any other pickled object is refused with an error naming it. An empty,
    truncated or non-torch file raises NotACheckpointError with its size."""
    try:
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        if wanted is None:  # not a pickle torch can read: garbage, not a refused object
            raise _not_a_checkpoint(path, err) from err
        name = wanted.group(1)
        # Never retry with weights_only=False ourselves: that would run the file's code.
        raise pickle.UnpicklingError(
            f"{os.fspath(path)!r} contains a pickled `{name}`, which weights-only loading "
            f"refuses because unpickling arbitrary objects can run code. If you trust the file, "
            f"allow that global for the call: `with torch.serialization.safe_globals([{name}]): "
            f"...load...`, or load it yourself with torch.load(path, weights_only=False) and "
            f"pass the state dict instead of the path.") from err
    except (EOFError, RuntimeError, KeyError, ValueError, IndexError, TypeError) as err:
        # What torch raises for an empty file (EOFError), a cut zip archive
        # (RuntimeError), or text / other bytes read as a legacy pickle (KeyError ...).
        raise _not_a_checkpoint(path, err) from err


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


TEMP_PATTERNS = (".checkpoint_*.pth.*.tmp", ".best.pth.*.tmp")


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_checkpoint(state: dict, path) -> Path:
    """Write atomically: a temporary file in the same folder, flushed to disk, then
    renamed over `path`. A crash at any point leaves the previous file intact
    (a killed process leaves its temporary file; `remove_stale_temp_files`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(out_dir) -> list[Path]:
    """Delete the temporary files of `save_checkpoint` in `out_dir` whose writer is
    gone (killed mid-write); a live process's file, and any other file, is kept."""
    removed = []
    for pattern in TEMP_PATTERNS:
        for tmp in Path(out_dir).glob(pattern):
            pid = tmp.name.rsplit(".", 2)[-2]  # .<name>.<pid>.tmp
            if not pid.isdigit() or (int(pid) != os.getpid() and _pid_alive(int(pid))):
                continue
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def saved_entry(path, key: str):
    """One top-level entry of the checkpoint at `path` (e.g. "best_ap", "config"), or
    None if there is none (read memory-mapped: the weights are not loaded)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with _namespace_allowed():
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: a new best.pth will replace it
        return None
    return state.get(key) if isinstance(state, dict) else None


def saved_best_ap(path):
    """The `best_ap` recorded in the checkpoint at `path`, or None if there is none."""
    return saved_entry(path, "best_ap")


class CheckpointManager:
    """Keeps `checkpoint_<step>.pth` for the last `keep_last` saves, and `best.pth`
    for the highest AP seen (never deleted by the rotation). best.pth's `best_ap`
    is the AP of its own weights. `best_ap`: the AP best.pth holds already (a resumed
    run), which a later epoch must beat to replace it."""

    def __init__(self, out_dir, keep_last: int = 2, best_ap=None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.out_dir, self.keep_last = Path(out_dir), keep_last
        self.best_ap = best_ap
        if self.out_dir.is_dir():
            remove_stale_temp_files(self.out_dir)

    def save(self, state: dict, step: int, ap=None) -> Path:
        path = save_checkpoint(state, self.out_dir / f"checkpoint_{step:08d}.pth")
        for old in sorted(self.out_dir.glob("checkpoint_*.pth"))[:-self.keep_last]:
            old.unlink()
        if ap is not None and (self.best_ap is None or ap > self.best_ap):
            self.best_ap = ap
            save_checkpoint({**state, "best_ap": ap}, self.out_dir / "best.pth")
        return path


def latest_checkpoint(out_dir) -> Path | None:
    """The newest `checkpoint_<step>.pth` in `out_dir`, or None."""
    found = sorted(Path(out_dir).glob("checkpoint_*.pth"))
    return found[-1] if found else None


def read_training_state(path) -> dict:
    """A `training_state` dict from `path` (or an exported file), checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = read_torch_file(path)
    if not isinstance(state, dict):
        raise NotACheckpointError(f"{path} is not a checkpoint (it holds a "
                                  f"{type(state).__name__}, not a dict)")
    missing = [k for k in ("model", "config", "epoch", "step") if k not in state]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint of this package (it lacks "
                         f"{missing}); official and HuggingFace weights load with "
                         f"model_files.load_model, or start a run with train --init-from")
    return state


def restore_training_state(state: dict, model, optimizer=None, scheduler=None,
                           scaler=None) -> dict:
    """Load a `read_training_state` dict into the given objects; returns it."""
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return state


def load_training_state(path, model, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Restore a `training_state` file into the given objects; returns the state
    (epoch, step_in_epoch, step, rng, best_ap, config, meta ...)."""
    return restore_training_state(read_training_state(path), model, optimizer, scheduler,
                                  scaler)
