"""Named detector outputs: a dataclass that also reads like the official dict.

`DetectionOutput` holds what a detector predicts; `outputs["pred_logits"]`,
`"aux_outputs" in outputs`, `outputs.get("enc_outputs")` and `outputs.keys()`
work as on the official dict (a field that is None is absent), so the
criterion, the matcher and the post-processor take either. Every detector of
the library returns one; where the attention sampled is not in it, but in
`ddetr_tutorial.recording`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass(eq=False)
class DetectionOutput(Mapping):
    """One set of predictions, and for the final layer the others.

    pred_logits: (N, Q, classes) sigmoid logits; pred_boxes: (N, Q, 4) cxcywh in
    [0, 1] of each unpadded image; aux_outputs: one `DetectionOutput` per earlier
    decoder layer (with aux_loss); enc_outputs: the encoder's proposals (two-stage);
    dn_outputs: the denoising queries' predictions (DN, in training only);
    one2many_outputs: the one-to-many queries' (hybrid matching, in training only).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[DetectionOutput] | None = None
    enc_outputs: DetectionOutput | None = None
    dn_outputs: DetectionOutput | None = None
    one2many_outputs: DetectionOutput | None = None

    def __getitem__(self, key: str):
        value = getattr(self, key, None) if key in _KEYS else None
        if value is None:
            raise KeyError(f"{key!r}; this output holds {list(self)}")
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key in _KEYS if getattr(self, key) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        parts = []
        for key in self:
            value = self[key]
            if isinstance(value, Tensor):
                parts.append(f"{key}={tuple(value.shape)}")
            else:
                parts.append(f"{key}=[{len(value)}]" if isinstance(value, list) else f"{key}=...")
        return f"DetectionOutput({', '.join(parts)})"


_KEYS = tuple(f.name for f in fields(DetectionOutput))

# A pytree node, so DistributedDataParallel and torch.compile see the tensors inside.
torch.utils._pytree.register_dataclass(DetectionOutput)
