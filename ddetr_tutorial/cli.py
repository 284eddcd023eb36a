"""Command line: `python -m ddetr_tutorial <command> ...` (`--help` on each)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

from .shipped import SHIPPED, resolve_checkpoint


def build_ops(args) -> int:
    """Build (or find cached) the compiled backends so later runs start at once."""
    import torch

    from .ops import custom_op, loader

    wanted = list(loader.BACKENDS) if args.backend == "all" else [args.backend]
    failed = 0
    for backend in wanted:
        if backend == "cuda" and torch.version.cuda is None and args.backend == "all":
            print(f"cuda: skipped (torch {torch.__version__} has no CUDA)")
            continue
        start = time.perf_counter()
        try:
            module = loader.load_extension(backend)
        except loader.BuildError as err:
            print(f"{backend}: FAILED: {err}", file=sys.stderr)
            failed += 1
            continue
        kernels = ", ".join(custom_op.registered_kernels(backend))
        print(f"{backend}: ready in {time.perf_counter() - start:.1f} s ({module.__file__}); "
              f"{custom_op.DISPATCH_KEYS[backend]} kernels of {kernels}")
    return 1 if failed else 0


def _parse_overrides(items):
    """['lr=1e-4', 'with_box_refine=true'] -> {'lr': 0.0001, 'with_box_refine': True}."""
    overrides = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        lowered = text.strip().lower()
        if lowered in ("true", "false", "none"):
            overrides[key] = {"true": True, "false": False, "none": None}[lowered]
            continue
        try:
            overrides[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[key] = text
    return overrides


def _checkpoint(text: str) -> Path:
    """--checkpoint: a file or a shipped name; a bad one stops at parsing, saying why."""
    try:
        return resolve_checkpoint(text)
    except (ValueError, FileNotFoundError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _resume(text: str) -> str:
    """--resume: a checkpoint file, or a run folder meaning its latest checkpoint."""
    if Path(text).is_dir():
        from .checkpoints import latest_checkpoint

        found = latest_checkpoint(text)
        if found is None:
            raise argparse.ArgumentTypeError(f"{text} is a folder with no checkpoint_*.pth "
                                             f"to resume from")
        return str(found)
    return text


CHECKPOINT_HELP = (f"a checkpoint of any kind: this package's (training or exported), an "
                   f"official Deformable DETR .pth, a HuggingFace folder or weights file; or a "
                   f"shipped name ({', '.join(SHIPPED)})")


def _datasets(args, cfg, splits=("train", "val"), category_ids=None, augment=("train",)):
    """COCO datasets from --data (a make-data folder) or explicit --*-ann/--*-images.

    Only the splits named in `augment` get the training transforms; evaluating any split
    (the training split included) must see the deterministic validation transforms.
    """
    from .config import build_transforms
    from .data import CocoDetection

    sets = {}
    for split in splits:
        ann = getattr(args, f"{split}_ann", None)
        images = getattr(args, f"{split}_images", None)
        if ann is None:
            if args.data is None:
                raise SystemExit(f"give --data or --{split}-ann and --{split}-images")
            ann = Path(args.data) / "annotations" / f"instances_{split}.json"
            images = Path(args.data) / split
        if "train" in sets:  # validation labels follow the training set's order
            category_ids = sets["train"].category_ids
        sets[split] = CocoDetection(images, ann, build_transforms(cfg, "train" if split in augment
                                                                  else "val"),
                                    category_ids=category_ids)
    return sets


def make_data(args) -> int:
    from .data import make_shapes

    start = time.perf_counter()
    summary = make_shapes(args.out, num_train=args.train, num_val=args.val, size=args.size,
                          seed=args.seed)
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


def _config(args):
    """The preset --config with the --set overrides; a bad field stops here, in one
    line, before any data is read or a model is built."""
    from .config import get_config

    try:
        return get_config(args.config, **_parse_overrides(args.set))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{args.command}: {err}") from None


def train(args) -> int:
    from .checkpoints import latest_checkpoint, saved_entry
    from .config import Config
    from .engine import fit, is_main_process
    from .model_card import write_model_card

    cfg, source = _train_config(args)
    sets = _datasets(args, cfg)
    classes = len(sets["train"].category_ids)
    if source is not None or cfg.num_classes < classes:  # fine-tuning: exactly the data's
        cfg = cfg.replace(num_classes=classes)
    start = time.perf_counter()
    metrics = fit(cfg, sets["train"], sets["val"], args.out, epochs=args.epochs,
                  resume=args.resume, seed=args.seed, num_workers=args.workers,
                  device=args.device, amp=args.amp, eval_every=args.eval_every,
                  checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
                  max_steps=args.max_steps, progress=not args.quiet, init_from=source,
                  budget_min=args.budget_min)
    if is_main_process() and metrics:
        # The config the run really used: a resumed run restores some fields (lr ...).
        saved = saved_entry(latest_checkpoint(args.out), "config")
        write_model_card(Path(args.out), Config(**saved) if saved else cfg,
                         time.perf_counter() - start, metrics, args.argv)
    return 0


def _train_config(args):
    """(cfg, the --init-from ModelFile or None). With --init-from the checkpoint's own
    config is the base (its architecture and recipe), changed by --set."""
    if args.init_from is None:
        args.config = args.config or "tiny"
        return _config(args), None
    if args.config is not None:
        raise SystemExit("train: --config and --init-from exclude each other: the model "
                         "comes from the --init-from checkpoint; change its settings with --set")
    from .model_files import read_model_file

    source = read_model_file(args.init_from)
    if is_main():
        print(f"init-from {source.describe()}")
    try:
        cfg = source.cfg.replace(pretrained_backbone=None, **_parse_overrides(args.set))
    except (TypeError, ValueError) as err:
        raise SystemExit(f"train: {err}") from None
    return cfg, source


def is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _load(args):
    """load_model for --checkpoint (any kind), printing what was detected."""
    from .model_files import load_model

    model, cfg, postprocess, meta = load_model(args.checkpoint, device=args.device)
    print(f"checkpoint {meta['detected']}")
    return model, cfg, postprocess, meta


def _evaluation_ids(model_ids, dataset) -> list:
    """label -> COCO id of the model's outputs, checked against the file's categories:
    every category scored must be one the model predicts (a 91-class COCO model knows
    ids the file does not use; that is fine)."""
    if model_ids is None:
        return dataset.category_ids
    unknown = sorted(set(dataset.category_ids) - set(model_ids))
    if unknown:
        raise ValueError(f"{dataset.ann_file}: categories {unknown} are not among the "
                         f"checkpoint's category ids {list(model_ids)}")
    return list(model_ids)


def evaluate(args) -> int:
    from .data import collate_fn
    from .engine import evaluate as run_evaluation
    from .reproducibility import make_loader

    model, cfg, postprocess, meta = _load(args)
    split = args.split
    dataset = _datasets(args, cfg, splits=(split,), augment=())[split]
    category_ids = _evaluation_ids(meta.get("category_ids"), dataset)
    loader = make_loader(dataset, cfg.batch_size, False, collate_fn, num_workers=args.workers)
    device = next(model.parameters()).device
    metrics, table = run_evaluation(model, postprocess, loader, dataset.coco, category_ids,
                                    device, progress=not args.quiet)
    print(table.rstrip())
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def predict(args) -> int:
    from .predict import predict_images

    model, cfg, postprocess, meta = _load(args)
    written = predict_images(model, cfg, postprocess, args.images, args.out,
                             threshold=args.threshold,
                             class_names=args.names or meta.get("class_names"),
                             category_ids=meta.get("category_ids"))
    print(f"wrote {written} to {args.out}")
    return 0


def export(args) -> int:
    from .model_files import export_model, read_model_file

    source = read_model_file(args.checkpoint)
    print(f"checkpoint {source.describe()}")
    path = export_model(source, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


def visualize(args) -> int:
    """Draw where one query's deformable attention samples (paper Fig. 6) to --out."""
    import matplotlib.pyplot as plt

    from .config import build_transforms
    from .data import read_rgb
    from .visualize import encoder_query, plot_sampling_points, query_points, sampling_data

    model, cfg, _, meta = _load(args)
    image = read_rgb(args.image, "--image")
    try:
        data = sampling_data(model, image, transform=build_transforms(cfg, "val"),
                             class_names=meta.get("class_names"))
        kind, query = "decoder", args.query
        if args.pixel is not None:  # given in the file's pixels; the model saw it resized
            kind = "encoder"
            h, w = data["image_size"]
            x, y = args.pixel[0] * w / image.width, args.pixel[1] * h / image.height
            query = encoder_query(data, x, y, level=args.level)
        points = query_points(data, kind, args.layer, query)
        fig = plot_sampling_points(data, kind=kind, query=points["query"], layer=points["layer"],
                                   per_level=not args.all_levels)
    except ValueError as err:
        raise SystemExit(f"visualize: {err}") from err
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out}: {kind} layer {points['layer']}, query {points['query']}")
    return 0


def pretrain_backbone(args) -> int:
    """Pretrain a ResNet on synthetic classification; weights + card to --out."""
    from .pretraining import pretrain

    pretrain(args.out, backbone=args.backbone, width=args.width, image_size=args.size,
             num_train=args.train, num_val=args.val, epochs=args.epochs,
             batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
             weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
             budget_min=args.budget_min,
             seed=args.seed, threads=args.threads, device=args.device, half=not args.float32,
             command="python -m ddetr_tutorial " + " ".join(args.argv))
    return 0


def _add_data_args(p, splits):
    p.add_argument("--data", help="a dataset folder as written by make-data: "
                   "annotations/instances_<split>.json and <split>/ images")
    for split in splits:
        p.add_argument(f"--{split}-ann", help=f"COCO instances JSON of the {split} split "
                       "(instead of --data)")
        p.add_argument(f"--{split}-images", help=f"image folder of the {split} split")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ddetr_tutorial",
                                     description="Deformable DETR, built piece by piece.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also accepted after the "
                        "command); without it an error is one line")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("make-data", help="write a synthetic COCO-format dataset",
                            description="Write a synthetic dataset of coloured shapes as COCO "
                            "JSON + PNG images (deterministic per seed).")
    p.add_argument("kind", choices=["shapes"], help="which dataset (shapes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation images (default 200)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=make_data)

    p = commands.add_parser("train", help="train a detector",
                            description="Train a detector on a COCO-format dataset, evaluating "
                            "with pycocotools after every epoch. Writes checkpoints (last K and "
                            "best), log.jsonl and curves.png to --out. Under `torchrun "
                            "--nproc_per_node=G -m ddetr_tutorial train ...` it trains with "
                            "DistributedDataParallel (nccl on GPU, gloo on CPU).")
    p.add_argument("--config", default=None, help="preset: tiny, paper, single_scale, dc5, "
                   "box_refine, two_stage, detr, detr_dc5, detr_plus, detr_dc5_plus, "
                   "tiny_pretrained (default tiny; not with --init-from)")
    p.add_argument("--init-from", type=_checkpoint, default=None, metavar="CKPT",
                   help="fine-tune: start from the weights of any checkpoint (" + CHECKPOINT_HELP
                   + "); its config is the base, --set changes it, and the class head is "
                   "re-initialised when the data has another number of classes")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="override config fields, e.g. --set lr=1e-4 with_box_refine=true")
    _add_data_args(p, ("train", "val"))
    p.add_argument("--out", required=True, help="output folder for checkpoints and logs")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's epochs")
    p.add_argument("--resume", type=_resume, help="a checkpoint, or a run folder (its latest "
                   "checkpoint), to continue from exactly")
    p.add_argument("--budget-min", type=float, default=None, metavar="M",
                   help="stop, checkpointed, before an epoch that would end past M minutes; "
                        "continue with --resume OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision (CUDA)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also checkpoint every N steps (default: only at epoch ends)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept besides the best")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (and checkpoint) after N steps")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=train)

    p = commands.add_parser("evaluate", help="COCO evaluation of a checkpoint",
                            description="Evaluate a checkpoint with pycocotools COCOeval (bbox) "
                            "and print the standard table.")
    p.add_argument("--checkpoint", required=True, type=_checkpoint, help=CHECKPOINT_HELP)
    _add_data_args(p, ("val",))
    p.add_argument("--split", default="val", help="split name under --data (default val)")
    p.add_argument("--out", help="also write the metrics as JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=evaluate)

    p = commands.add_parser("predict", help="detect objects in images",
                            description="Run a checkpoint on images: writes predictions.json "
                            "(COCO result format, with file names) and an annotated PNG per "
                            "image to --out.")
    p.add_argument("--checkpoint", required=True, type=_checkpoint, help=CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True)
    p.add_argument("--threshold", type=float, default=0.5, help="drawn score threshold")
    p.add_argument("--names", nargs="*", help="class names in label order (default: from the "
                   "checkpoint, else numbers)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=predict)

    p = commands.add_parser("export", help="write any checkpoint as a weights-only file",
                            description="Write the model weights, config and metadata of any "
                            "checkpoint (ours, official, HuggingFace) as this package's "
                            "weights-only file (no optimizer or RNG state); every command "
                            "reads it.")
    p.add_argument("--checkpoint", required=True, type=_checkpoint, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="the file to write")
    p.set_defaults(func=export)

    p = commands.add_parser("visualize", help="draw where the attention samples (paper Fig. 6)",
                            description="Run a checkpoint on one image and draw one query's "
                            "sampling points and attention weights, a panel per feature level: "
                            "by default the decoder query of the top detection; --pixel picks "
                            "the encoder query at a pixel instead.")
    p.add_argument("--checkpoint", required=True, type=_checkpoint, help=CHECKPOINT_HELP)
    p.add_argument("--image", required=True, help="an image file")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--query", type=int, default=None,
                       help="decoder object query index (default: the top detection)")
    which.add_argument("--pixel", type=float, nargs=2, metavar=("X", "Y"), default=None,
                       help="encoder query at this pixel of the image file")
    p.add_argument("--level", type=int, default=0,
                   help="feature level of the --pixel query (default 0, the finest)")
    p.add_argument("--layer", type=int, default=-1,
                   help="encoder/decoder layer, from 0; negative counts from the end "
                   "(default -1, the last, as in the paper)")
    p.add_argument("--all-levels", action="store_true",
                   help="all levels on one image instead of a panel per level")
    p.add_argument("--out", required=True, help="the PNG (or PDF, SVG) to write")
    p.add_argument("--dpi", type=int, default=150)
    p.add_argument("--device", default=None)
    p.set_defaults(func=visualize)

    p = commands.add_parser("pretrain-backbone", help="pretrain a ResNet on synthetic "
                            "classification (the paper's ImageNet step, in miniature)",
                            description="Train a ResNet + average pool + linear classifier on "
                            "20 synthetic classes (shapes the detector never sees, outlines, "
                            "textures, clutter), made in memory and disjoint by seed from every "
                            "detection set; stop at the budget; write the weights in "
                            "torchvision's ResNet layout to --out, and a card (.json, .md) "
                            "beside it with the held-out top-1.")
    p.add_argument("--out", required=True, help="the weights file to write (.pth)")
    p.add_argument("--backbone", default="resnet18", help="resnet18/34/50/101 (default resnet18)")
    p.add_argument("--width", type=int, default=32, help="base channels (default 32)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--train", type=int, default=16000, help="training images (default 16000)")
    p.add_argument("--val", type=int, default=2000, help="held-out images (default 2000)")
    p.add_argument("--epochs", type=int, default=100,
                   help="at most this many epochs (default 100; the budget usually ends first)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--budget-min", type=float, default=30.0,
                   help="wall-clock minutes for everything, data included (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 is faster on a busy CPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--float32", action="store_true", help="store float32 weights (default "
                   "float16: half the file, its top-1 re-measured)")
    p.set_defaults(func=pretrain_backbone)

    p = commands.add_parser("build-ops", help="compile the C++/CUDA kernels of ms_deform_attn",
                            description="Compile the C++ CPU and CUDA kernels of ms_deform_attn "
                            "into the extension cache ($TORCH_EXTENSIONS_DIR), or find them "
                            "there. Exits non-zero if a requested backend fails to build.")
    p.add_argument("--backend", choices=["cpu", "cuda", "all"], default="all",
                   help="which kernel to build (default: all; cuda is skipped when torch "
                   "has no CUDA)")
    p.set_defaults(func=build_ops)
    return parser


def _one_line(err: BaseException) -> str:
    """An exception as one line, newlines folded; the type is named unless it is a
    plain bad-input error, whose message names the file or value already."""
    text = " ".join(str(err).split()) or "(no message)"
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    plain = (ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError)
    return text if isinstance(err, plain) else f"{type(err).__name__}: {text}"


def main(argv=None) -> int:
    """Run one command. An error is printed as one line ("<command>: <Type>: <message>",
    naming the file or flag) and exits 1; `--debug` (anywhere) shows the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = make_parser().parse_args(argv)
    args.argv = argv  # for the model card: the exact command
    if debug:
        return args.func(args)
    try:
        return args.func(args)
    except Exception as err:  # noqa: BLE001 - every error becomes one line
        print(f"{args.command}: {_one_line(err)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
