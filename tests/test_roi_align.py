"""RoIAlign: both backends equal the float64 loop reference (torchvision's rules), known
values worked out by hand on a 2x2 map, gradcheck, and bad inputs."""

import pytest
import torch

from ddetr_tutorial.roi_align import BACKEND_CHOICES, BACKENDS, roi_align, roi_align_reference

H, W = 6, 8


def _edge_boxes():
    """Boxes that touch or cross the image edge, lie outside it, or are under a pixel."""
    return torch.tensor([
        [0.0, 0.0, W, H],                  # the whole image, touching all four edges
        [-3.0, -2.0, 2.0, 3.0],            # crosses the top-left corner
        [6.0, 4.0, W + 2.0, H + 3.0],      # crosses the bottom-right corner
        [W - 1.0, 0.0, W, H],              # a strip touching the right edge
        [-1.5, -1.5, W + 1.5, H + 1.5],    # larger than the image
        [W + 0.5, H + 0.5, W + 4.0, H + 6.0],  # entirely outside (bottom right)
        [-9.0, -9.0, -2.5, -1.5],          # entirely outside (top left)
        [-0.9, 2.0, 0.3, 2.2],             # tiny, on the left edge
        [3.2, 2.6, 3.3, 2.65],             # tiny, inside
        [4.0, 4.0, 4.0, 4.0],              # a point
    ], dtype=torch.float64)


def _random_boxes(gen, k, scale=1.0):
    ctr = torch.rand(k, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    ctr = ctr * torch.tensor([W, H], dtype=torch.float64) / scale
    size = torch.rand(k, 2, generator=gen, dtype=torch.float64) ** 2 * 1.2 * W / scale
    return torch.cat([ctr - size / 2, ctr + size / 2], 1)


def _features_and_boxes(scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, 2, H, W, generator=gen, dtype=torch.float64)
    boxes = [torch.cat([_edge_boxes() / scale, _random_boxes(gen, 6, scale)]),
             _random_boxes(gen, 4, scale),
             _random_boxes(gen, 0, scale)]   # an image without boxes
    return feats, boxes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 0])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_equals_reference(backend, aligned, sampling_ratio, spatial_scale):
    feats, boxes = _features_and_boxes(spatial_scale)
    args = (feats, boxes, (3, 4), spatial_scale, sampling_ratio, aligned)
    want = roi_align_reference(*args)
    got = roi_align(*args, backend=backend)
    assert got.shape == (20, 2, 3, 4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_ms_deform_attn_route_through_the_op_reference(monkeypatch):
    # DDETR_BACKEND=pytorch: the op's grid_sample reference (zero padding) under the route.
    monkeypatch.setenv("DDETR_BACKEND", "pytorch")
    feats, boxes = _features_and_boxes(seed=3)
    want = roi_align_reference(feats, boxes, 5, 1.0, 0, True)
    got = roi_align(feats, boxes, 5, 1.0, 0, True, backend="ms_deform_attn")
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKEND_CHOICES)
def test_batch_index_form_and_float32(backend):
    feats, boxes = _features_and_boxes(seed=1)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1)
                      for i, b in enumerate(boxes)])
    rois = rois[torch.randperm(len(rois), generator=torch.Generator().manual_seed(0))]
    want = roi_align_reference(feats, rois, 7)
    torch.testing.assert_close(roi_align(feats, rois, 7, backend=backend), want,
                               atol=1e-12, rtol=0)
    got32 = roi_align(feats.float(), rois.float(), 7, backend=backend)
    torch.testing.assert_close(got32, want.float(), atol=1e-5, rtol=1e-5)


# A 2x2 map f = [[1, 2], [3, 4]], i.e. f(y, x) = 1 + x + 2y between pixel centres.
HAND_CASES = [
    # aligned: box (0, 0, 2, 2) -> (-0.5, -0.5, 1.5, 1.5); 2x2 bins of size 1, one sample
    # each at the bin centre = exactly the pixel centres.
    (dict(box=[0, 0, 2, 2], size=2, ratio=1, aligned=True), [[1.0, 2.0], [3.0, 4.0]]),
    # not aligned: box (0, 0, 1, 1), one bin, samples at 0.25 and 0.75 per axis;
    # f is linear there, so the mean is f(0.5, 0.5) = 2.5.
    (dict(box=[0, 0, 1, 1], size=1, ratio=2, aligned=False), [[2.5]]),
    # not aligned: box (-2, -2, 0, 0), sample at y = x = -1: not below -1, clamped to 0 -> 1.
    (dict(box=[-2, -2, 0, 0], size=1, ratio=1, aligned=False), [[1.0]]),
    # not aligned: box (-3, -3, -1, -1), sample at -2 < -1 -> 0.
    (dict(box=[-3, -3, -1, -1], size=1, ratio=1, aligned=False), [[0.0]]),
    # not aligned: box (1, 1, 4, 4), samples at 1.75 and 3.25 per axis; 1.75 >= H - 1 reads
    # pixel 1, 3.25 > H is 0: only (1.75, 1.75) counts, f = 4, divided by all 4 samples -> 1.
    (dict(box=[1, 1, 4, 4], size=1, ratio=2, aligned=False), [[1.0]]),
    # aligned, adaptive: box (0, 0, 2, 1) -> roi 2 wide, 1 high, one bin: grid 1 x 2,
    # samples at y = 0, x = 0 and 1 -> (1 + 2) / 2.
    (dict(box=[0, 0, 2, 1], size=1, ratio=0, aligned=True), [[1.5]]),
]


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("case,want", HAND_CASES)
def test_hand_computed(backend, case, want):
    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    boxes = [torch.tensor([case["box"]], dtype=torch.float64)]
    args = (feats, boxes, case["size"], 1.0, case["ratio"], case["aligned"])
    if backend == "reference":
        got = roi_align_reference(*args)
    else:
        got = roi_align(*args, backend=backend)
    torch.testing.assert_close(got[0, 0], torch.tensor(want, dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    feats, boxes = _features_and_boxes(seed=2)
    feats = feats[:2, :, :4, :5].clone().requires_grad_(True)
    boxes = [b[:6] * 0.6 for b in boxes[:2]]  # edge-crossing, outside and tiny boxes

    def fn(f):
        return roi_align(f, boxes, (2, 3), 1.0, 2, True, backend=backend)

    assert torch.autograd.gradcheck(fn, (feats,), eps=1e-6, atol=1e-8)


def test_no_boxes():
    feats = torch.randn(2, 3, 4, 4)
    out = roi_align(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], 7)
    assert out.shape == (0, 3, 7, 7)


@pytest.mark.parametrize("call,err,match", [
    (lambda f, b: roi_align(f[0], b, 7), ValueError, r"\(N, C, H, W\)"),
    (lambda f, b: roi_align(f.long(), b, 7), TypeError, "floating"),
    (lambda f, b: roi_align(f.numpy(), b, 7), TypeError, "torch.Tensor"),
    (lambda f, b: roi_align(f, b[:1], 7), ValueError, "list of 1 tensors but features hold 2"),
    (lambda f, b: roi_align(f, [b[0], b[1][:, :3]], 7), ValueError, r"boxes\[1\] must be"),
    (lambda f, b: roi_align(f, torch.zeros(3, 4), 7), ValueError, r"\(K, 5\)"),
    (lambda f, b: roi_align(f, torch.tensor([[2.0, 0, 0, 1, 1]]), 7), ValueError,
     r"batch index 2.0 is not an image index in \[0, 2\)"),
    (lambda f, b: roi_align(f, torch.tensor([[0.5, 0, 0, 1, 1]]), 7), ValueError, "0.5"),
    (lambda f, b: roi_align(f, "boxes", 7), TypeError, "got str"),
    (lambda f, b: roi_align(f, b, -1), ValueError, "positive, got -1"),
    (lambda f, b: roi_align(f, b, (7, 0)), ValueError, r"positive, got \(7, 0\)"),
    (lambda f, b: roi_align(f, b, 7.0), TypeError, "output_size"),
    (lambda f, b: roi_align(f, b, 7, sampling_ratio=2.0), TypeError, "sampling_ratio"),
    (lambda f, b: roi_align(f, b, 7, spatial_scale=0.0), ValueError, "spatial_scale"),
    (lambda f, b: roi_align(f, b, 7, backend="cuda"), ValueError, "backend must be one of"),
    (lambda f, b: roi_align_reference(f, b, 0), ValueError, "positive, got 0"),
    (lambda f, b: roi_align(f.to("meta"), b, 7), ValueError, "on cpu but features on meta"),
])
def test_bad_input(call, err, match):
    feats = torch.randn(2, 3, 4, 4)
    boxes = [torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])]
    with pytest.raises(err, match=match):
        call(feats, boxes)
