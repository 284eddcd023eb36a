"""Where the trained race models look, and the four logit terms of the trained DETR.

Reads the final checkpoints `detr_family.py run` leaves under runs/detr_family/<run>/ and
writes what notebook 12 draws without the models:

- benchmarks/results/family_views/<member>.json: `family_views.where_it_looks` for the
  six members notebook 12 section 8 draws (one seed), on the busiest of the first 64
  shapes validation images (the image the notebook picks in full mode), each view
  tagged with name, run, data_seed and image_index;
- benchmarks/results/detr_family_terms.json: for every trained DETR seed, the spread
  over the keys and the mean magnitude of each of the four terms of DETR's
  cross-attention logits (`family_views.term_magnitudes`), decoder layer by layer, on
  those 64 images; and the content keys' share of the spread.

    python benchmarks/race_views.py               # after detr_family.py run
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ddetr_tutorial import family_views  # noqa: E402
from ddetr_tutorial.checkpoints import latest_checkpoint, read_training_state  # noqa: E402
from ddetr_tutorial.config import build_transforms  # noqa: E402
from ddetr_tutorial.data import build_dataset, collate_fn  # noqa: E402
from ddetr_tutorial.model_files import load_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VIEW_MEMBERS = {"detr": "DETR", "conditional_detr": "Conditional DETR",
                "anchor_detr": "Anchor DETR", "deformable_detr": "Deformable DETR",
                "dynamic_detr": "Dynamic DETR", "sparse_rcnn": "Sparse R-CNN"}
NUM_IMAGES = 64


def data_seed(data: Path) -> int:
    """The seed make-data wrote into the validation annotations' description."""
    path = data / "annotations" / "instances_val.json"
    if not path.is_file():
        raise SystemExit(f"{data} has no annotations/instances_val.json: make it with "
                         f"`python -m ddetr_tutorial make-data shapes --out {data}`")
    description = json.loads(path.read_text()).get("info", {}).get("description", "")
    found = re.search(r"seed (\d+)", description)
    if not found:
        raise SystemExit(f"{path}: no 'seed N' in its info description {description!r}; "
                         f"race views need the shapes data that make-data writes")
    return int(found.group(1))


def trained(runs_dir: Path, member: str, epochs: int, seed: int):
    """(model, cfg, run) from the run's last checkpoint; SystemExit if it is unfinished."""
    run = f"{member}_{epochs}ep_s{seed}"
    checkpoint = latest_checkpoint(runs_dir / run)
    if checkpoint is None:
        raise SystemExit(f"{runs_dir / run} has no checkpoint: train it with "
                         f"`python benchmarks/detr_family.py run --only {member} --seeds {seed}`")
    model, cfg, _, _ = load_model(checkpoint, device="cpu")
    state = read_training_state(checkpoint)
    if state["epoch"] < cfg.epochs or state["step_in_epoch"]:
        raise SystemExit(f"{checkpoint} is from an unfinished run ({cfg.epochs} epochs "
                         f"planned): finish it with detr_family.py run first")
    return model, cfg, run


def validation(data: Path, cfg):
    val = build_dataset(data, "val", build_transforms(cfg, "val"))
    count = min(NUM_IMAGES, len(val))
    return val, count, max(range(count), key=lambda i: len(val[i][1]["labels"]))


def record_views(args) -> list[Path]:
    seed_of_data = data_seed(Path(args.data))
    out_dir = Path(args.views_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for member, name in VIEW_MEMBERS.items():
        model, cfg, run = trained(Path(args.runs_dir), member, args.epochs, args.seed)
        val, _, index = validation(Path(args.data), cfg)
        images, mask, _ = collate_fn([val[index]])
        view = family_views.where_it_looks(model, images, mask, top=3)[0]
        view.update(name=name, run=run, data_seed=seed_of_data, image_index=index)
        written.append(family_views.save_views(out_dir / f"{member}.json", [view]))
        print(f"{name}: {run}, image {index}, best score {float(view['scores'][0]):.2f}")
    return written


def detr_terms(model, cfg, images, mask) -> dict:
    layers = {}
    for d in range(cfg.dec_layers):
        inputs, _ = family_views.cross_attention_inputs(model, images, mask, layer=d)
        with torch.no_grad():
            terms = family_views.logit_terms(
                model.transformer.decoder.layers[d].multihead_attn, inputs["query_content"],
                inputs["query_pos"], inputs["key_content"], inputs["key_pos"])
        row = family_views.term_magnitudes(terms, inputs["padding_mask"])
        spread = sum(t["key_std"] for t in row.values())
        row["content_share"] = (row["content_content"]["key_std"]
                                + row["spatial_content"]["key_std"]) / spread
        layers[str(d + 1)] = row
    return layers


def record_terms(args) -> Path:
    seeds = {}
    for seed in args.term_seeds:
        model, cfg, run = trained(Path(args.runs_dir), "detr", args.epochs, seed)
        val, count, _ = validation(Path(args.data), cfg)
        images, mask, _ = collate_fn([val[i] for i in range(count)])
        with torch.no_grad():
            seeds[str(seed)] = {"run": run, "images": count,
                                "layers": detr_terms(model, cfg, images, mask)}
        shares = [round(r["content_share"], 2) for r in seeds[str(seed)]["layers"].values()]
        print(f"DETR {run}: content keys' share of the spread per layer {shares}")
    out = Path(args.terms_out)
    out.write_text(json.dumps({
        "what": "DETR's cross-attention logits (c_q + p_q)^T (c_k + p_k) / sqrt(D) split into "
                "four terms; key_std: spread over the valid keys (what moves the softmax), "
                "mean_abs: mean |term|; content_share: (cc + sc) key_std over all four",
        "data_seed": data_seed(Path(args.data)), "seeds": seeds,
        "command": "python benchmarks/race_views.py"}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "data" / "shapes"))
    p.add_argument("--runs-dir", default=str(ROOT / "runs" / "detr_family"))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0, help="the training seed whose views to record")
    p.add_argument("--term-seeds", nargs="*", type=int, default=[0, 1])
    p.add_argument("--views-dir", default=str(RESULTS / "family_views"))
    p.add_argument("--terms-out", default=str(RESULTS / "detr_family_terms.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record_views(args)
    record_terms(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
