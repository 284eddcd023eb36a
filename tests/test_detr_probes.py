"""benchmarks/detr_stall_probe.py and detr_attention_probe.py: the measured quantities
against computations by hand (the class-blind loss) and against
nn.MultiheadAttention's own attention weights (the recomputed attention)."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import detr_attention_probe  # noqa: E402
import detr_stall_probe  # noqa: E402
from ddetr_tutorial.backbone import build_backbone  # noqa: E402
from ddetr_tutorial.detr import DETR  # noqa: E402


def test_class_blind_ce_by_hand():
    # 2 images, Q = 4, eos 0.1: labels {0, 0} and {1}; no-object weight 0.1 * (2 + 3) = 0.5
    targets = [{"labels": torch.tensor([0, 0])}, {"labels": torch.tensor([1])}]
    counts = [2.0, 1.0, 0.0, 0.5]  # class 0, 1, 2, no object
    total = sum(counts)
    expected = -sum(c / total * math.log(c / total) for c in counts if c)
    got = detr_stall_probe.class_blind_ce(targets, num_queries=4, num_classes=3, eos_coef=0.1)
    assert abs(got - expected) < 1e-6
    # ... and it is the weighted cross-entropy of predicting that histogram for every query
    logits = torch.tensor(counts).clamp_min(1e-9).log().expand(2, 4, 4).transpose(1, 2)
    target = torch.tensor([[0, 0, 3, 3], [1, 3, 3, 3]])
    ce = torch.nn.functional.cross_entropy(logits, target, torch.tensor([1, 1, 1, 0.1]))
    assert abs(float(ce) - expected) < 1e-5


def _tiny_detr():
    torch.manual_seed(0)
    backbone = build_backbone(name="resnet18", hidden_dim=64, return_interm_layers=False,
                              width=8, position_offset=0.0)
    return DETR(backbone, 4, num_queries=5, d_model=64, n_heads=4, num_encoder_layers=1,
                num_decoder_layers=2, d_ffn=32, dropout=0.0)


def test_group_of_covers_every_detr_parameter():
    model = _tiny_detr()
    groups = {name: detr_stall_probe.group_of(name) for name, _ in model.named_parameters()}
    assert "other" not in groups.values()
    assert groups["transformer.decoder.layers.0.self_attn.in_proj_bias"] == "dec0.self_attn.biases"
    assert groups["transformer.decoder.layers.0.self_attn.in_proj_weight"] == \
        "dec0.self_attn.weights"
    assert groups["transformer.decoder.layers.1.self_attn.in_proj_bias"] == "decoder.rest"


def test_recomputed_cross_attention_matches_multihead_attention():
    model = _tiny_detr().eval()
    entropy = detr_stall_probe.CrossAttentionEntropy(model)
    recorder = detr_attention_probe.Recorder(model)
    attn = model.transformer.decoder.layers[1].multihead_attn
    seen = {}
    attn.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    images = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[0, :, 64:] = True  # padding: image 0 is 96 x 64
    with torch.no_grad():
        model(images, mask)
        query, key, value = seen["args"]
        pad = seen["kwargs"]["key_padding_mask"]
        _, weights = attn(query, key, value, key_padding_mask=pad, need_weights=True,
                          average_attn_weights=False)  # (N, M, Q, S)
    assert torch.allclose(recorder.weights[1], weights.mean(1), atol=1e-6)
    ent = -(weights * weights.clamp_min(1e-12).log()).sum(-1)
    expected = (ent / (~pad).sum(1).float().log()[:, None, None]).mean()
    assert abs(entropy.values[1] - float(expected)) < 1e-5
    assert torch.equal(recorder.memory, value)
