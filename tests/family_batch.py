"""What the family members' training tests share: a padded batch of two images of
different shapes, and the check that one loss reaches every trainable parameter."""

from __future__ import annotations

import torch

from ddetr_tutorial.data import collate_fn


def padded_mixed_size_batch():
    """A 96x64 and a 64x96 image padded into one (2, 3, 96, 96) batch, and targets
    (labels, cxcywh boxes relative to each unpadded image): two objects, then one."""
    images, mask, _ = collate_fn([(torch.randn(3, 96, 64), None), (torch.randn(3, 64, 96), None)])
    targets = [{"labels": torch.tensor([0, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
    return images, mask, targets


def assert_every_parameter_gets_a_gradient(model, loss) -> None:
    """Back-propagate `loss`: every trainable parameter gets a gradient, and a finite one
    (a parameter left out of the graph would silently never train)."""
    assert torch.isfinite(loss), loss
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    assert [n for n, p in trainable if not torch.isfinite(p.grad).all()] == []
