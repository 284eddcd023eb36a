"""Hungarian matcher: equals brute force, batching, empty images, bad inputs, half precision."""

import itertools
import math

import pytest
import torch

from ddetr_tutorial.matcher import HungarianMatcher, focal_class_cost

NUM_CLASSES = 5


def random_problem(Qs_Ts, seed, num_classes=NUM_CLASSES):
    """outputs (N, Q, ...) and targets for images with the given target counts."""
    g = torch.Generator().manual_seed(seed)
    Q = Qs_Ts[0]
    N = len(Qs_Ts[1])
    outputs = {"pred_logits": 3 * torch.randn(N, Q, num_classes, generator=g),
               "pred_boxes": 0.1 + 0.5 * torch.rand(N, Q, 4, generator=g)}
    targets = [{"labels": torch.randint(0, num_classes, (T,), generator=g),
                "boxes": 0.1 + 0.5 * torch.rand(T, 4, generator=g)} for T in Qs_Ts[1]]
    return outputs, targets


# ---- an independent oracle: the cost of one (query, target) pair in plain Python ----

def oracle_giou(a_cxcywh, b_cxcywh):
    def corners(b):
        cx, cy, w, h = b
        return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    ax0, ay0, ax1, ay1 = corners(a_cxcywh)
    bx0, by0, bx1, by1 = corners(b_cxcywh)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def oracle_cost(logits, box, label, target_box, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-logits[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, target_box))
    return 2 * (pos - neg) + 5 * l1 + 2 * -oracle_giou(box, target_box)


def oracle_matrix(outputs, target, image):
    logits = outputs["pred_logits"][image].tolist()
    boxes = outputs["pred_boxes"][image].tolist()
    labels, target_boxes = target["labels"].tolist(), target["boxes"].tolist()
    return [[oracle_cost(logits[q], boxes[q], labels[t], target_boxes[t])
             for t in range(len(labels))] for q in range(len(logits))]


def brute_force_min(cost):
    """Minimum total cost of a one-to-one assignment of min(Q, T) pairs, over all permutations."""
    Q, T = len(cost), len(cost[0])
    if Q >= T:  # target t goes to query perm[t]
        return min(sum(cost[q][t] for t, q in enumerate(perm))
                   for perm in itertools.permutations(range(Q), T))
    return min(sum(cost[q][t] for q, t in enumerate(perm))  # query q gets target perm[q]
               for perm in itertools.permutations(range(T), Q))


@pytest.mark.filterwarnings("ignore:image 0 has")
@pytest.mark.parametrize("Q,T", [(6, 6), (6, 3), (4, 1), (3, 6), (1, 4), (5, 5), (2, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force(Q, T, seed):
    outputs, targets = random_problem((Q, [T]), seed=seed * 100 + Q * 10 + T)
    query_idx, target_idx = HungarianMatcher()(outputs, targets)[0]
    assert query_idx.dtype == target_idx.dtype == torch.int64
    assert len(query_idx) == len(target_idx) == min(Q, T)
    assert len(set(query_idx.tolist())) == len(set(target_idx.tolist())) == min(Q, T)
    cost = oracle_matrix(outputs, targets[0], 0)
    total = sum(cost[q][t] for q, t in zip(query_idx.tolist(), target_idx.tolist()))
    assert total == pytest.approx(brute_force_min(cost), abs=1e-4)


def test_cost_matrix_equals_oracle():
    outputs, targets = random_problem((4, [3, 2]), seed=7)
    cost = HungarianMatcher().cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets)
    assert cost.shape == (2 * 4, 3 + 2) and cost.dtype == torch.float32
    # Image 1's block: its queries (rows 4..7) against its targets (columns 3..4).
    torch.testing.assert_close(cost[4:, 3:], torch.tensor(oracle_matrix(outputs, targets[1], 1)),
                               rtol=1e-5, atol=1e-5)


def test_focal_class_cost_prefers_confident_right_class():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])  # query 0 says class 0, query 1 class 1
    cost = focal_class_cost(logits, torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]


def test_batched_equals_per_image_with_an_empty_image():
    outputs, targets = random_problem((6, [3, 0, 5, 1]), seed=3)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == 4
    for i, (query_idx, target_idx) in enumerate(batched):
        single = {k: v[i:i + 1] for k, v in outputs.items()}
        alone_q, alone_t = matcher(single, [targets[i]])[0]
        assert torch.equal(query_idx, alone_q) and torch.equal(target_idx, alone_t)
    assert batched[1][0].shape == batched[1][1].shape == (0,)


def test_per_image_costs_are_the_diagonal_blocks_of_the_cost_matrix():
    # forward() pads each image's targets to the longest list; the padding must not
    # leak into the real columns, whatever the image order.
    outputs, targets = random_problem((5, [2, 0, 4, 1]), seed=9)
    matcher = HungarianMatcher()
    full = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_boxes"], targets)
    starts = [0, 2, 2, 6, 7]
    for i, (query_idx, target_idx) in enumerate(matcher(outputs, targets)):
        block = full[5 * i:5 * (i + 1), starts[i]:starts[i + 1]].numpy()
        expected = brute_force_min(block.tolist()) if block.size else 0.0
        assert block[query_idx, target_idx].sum() == pytest.approx(expected, abs=1e-5)


def test_detr_sized_problem_and_identical_copies():
    # DETR's test_hungarian: 100 queries, 15 targets, 91 classes.
    outputs, targets = random_problem((100, [15]), seed=11, num_classes=91)
    matcher = HungarianMatcher()
    query_idx, target_idx = matcher(outputs, targets)[0]
    assert len(query_idx) == 15 and sorted(target_idx.tolist()) == list(range(15))
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    for q, t in matcher(doubled, targets * 2):
        assert torch.equal(q, query_idx) and torch.equal(t, target_idx)


def test_all_images_empty():
    outputs, _ = random_problem((4, [0, 0]), seed=0)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    indices = HungarianMatcher()(outputs, [empty, dict(empty)])
    assert [(q.shape, t.shape, q.dtype) for q, t in indices] == [((0,), (0,), torch.int64)] * 2


def test_matches_obvious_permutation():
    # Each query predicts exactly one target's box and class: the matching must find it.
    targets = [{"labels": torch.tensor([2, 0, 1]),
                "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.3, 0.2],
                                       [0.8, 0.3, 0.2, 0.4]])}]
    # Query 0 predicts nothing near; queries 1, 2, 3 predict targets 2, 0, 1.
    boxes = torch.cat([torch.tensor([[0.5, 0.9, 0.05, 0.05]]), targets[0]["boxes"][[2, 0, 1]]])
    logits = torch.full((4, 3), -6.0)
    logits[1, 1], logits[2, 2], logits[3, 0] = 6.0, 6.0, 6.0
    query_idx, target_idx = HungarianMatcher()({"pred_logits": logits[None],
                                                "pred_boxes": boxes[None]}, targets)[0]
    assert dict(zip(query_idx.tolist(), target_idx.tolist())) == {1: 2, 2: 0, 3: 1}


def test_more_targets_than_queries_warns_and_matches_every_query():
    outputs, targets = random_problem((2, [5]), seed=1)
    with pytest.warns(UserWarning, match="5 targets but the model has only 2 queries"):
        query_idx, target_idx = HungarianMatcher()(outputs, targets)[0]
    assert sorted(query_idx.tolist()) == [0, 1] and len(set(target_idx.tolist())) == 2


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, NUM_CLASSES + 7, -1])
def test_label_out_of_range_is_a_value_error(bad_label):
    outputs, targets = random_problem((4, [3, 2]), seed=0)
    targets[1]["labels"][1] = bad_label
    with pytest.raises(ValueError, match=rf"targets\[1\] has label {bad_label}.*num_classes=5"):
        HungarianMatcher()(outputs, targets)


def test_float_labels_are_a_type_error():
    outputs, targets = random_problem((4, [3]), seed=0)
    targets[0]["labels"] = targets[0]["labels"].float()
    with pytest.raises(TypeError, match="integer tensor"):
        HungarianMatcher()(outputs, targets)


def test_wrong_number_of_targets_and_bad_shapes():
    outputs, targets = random_problem((4, [3, 2]), seed=0)
    with pytest.raises(ValueError, match="1 target dicts for a batch of 2"):
        HungarianMatcher()(outputs, targets[:1])
    targets[0]["boxes"] = targets[0]["boxes"][:2]
    with pytest.raises(ValueError,
                       match=r"targets\[0\] must have labels \(T,\) and boxes \(T, 4\)"):
        HungarianMatcher()(outputs, targets)


def test_all_zero_or_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    with pytest.raises(ValueError, match="cost_bbox must be >= 0"):
        HungarianMatcher(cost_bbox=-1)


@pytest.mark.parametrize("key,value,term", [("pred_boxes", float("nan"), "bbox"),
                                            ("pred_boxes", float("inf"), "bbox"),
                                            ("pred_logits", float("nan"), "class")])
def test_non_finite_outputs_name_the_term_and_image(key, value, term):
    outputs, targets = random_problem((4, [2, 3, 1]), seed=0)
    outputs[key][1, 2, 0] = value
    with pytest.raises(FloatingPointError,
                       match=f"'{term}' matching cost is not finite for image 1"):
        HungarianMatcher()(outputs, targets)


def test_nan_in_an_image_without_targets_is_still_reported():
    outputs, targets = random_problem((4, [2, 0]), seed=0)
    outputs["pred_boxes"][1, 3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="'bbox' matching cost is not finite for image 1"):
        HungarianMatcher()(outputs, targets)


def test_nan_target_box_names_its_image():
    outputs, targets = random_problem((4, [2, 3]), seed=0)
    targets[1]["boxes"][2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="'bbox' matching cost is not finite for image 1"):
        HungarianMatcher()(outputs, targets)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_outputs_match_like_float32(dtype):
    # Predictions near a permutation of the targets, so the optimum is well separated
    # and rounding to 8 or 11 bits cannot change it.
    g = torch.Generator().manual_seed(5)
    outputs, targets = random_problem((8, [5, 3]), seed=5)
    for i, t in enumerate(targets):
        perm = torch.randperm(8, generator=g)[:len(t["labels"])]
        outputs["pred_boxes"][i, perm] = t["boxes"] + 0.01 * torch.randn(len(perm), 4, generator=g)
        outputs["pred_logits"][i, perm, t["labels"]] += 4.0
    matcher = HungarianMatcher()
    expected = matcher(outputs, targets)
    low = {k: v.to(dtype) for k, v in outputs.items()}
    for (q, t), (q_low, t_low) in zip(expected, matcher(low, targets)):
        assert torch.equal(q, q_low) and torch.equal(t, t_low)
    cost = matcher.cost_matrix(low["pred_logits"], low["pred_boxes"], targets)
    assert cost.dtype == torch.float32 and torch.isfinite(cost).all()


def test_no_gradient_flows_through_matching():
    outputs, targets = random_problem((4, [2]), seed=0)
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    query_idx, _ = HungarianMatcher()(outputs, targets)[0]
    assert not query_idx.requires_grad
