"""torch.ops.ddetr_tutorial.ms_deform_attn: registered, accepted by opcheck, traced by
torch.compile(fullgraph=True) with the eager results, forward and gradients."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from ddetr_tutorial.attention import MSDeformAttn
from ddetr_tutorial.ops import level_tensors, loader, ms_deform_attn
from msda_inputs import COMPILED, SHAPES, device_of, make_inputs, needs_cuda

OP = torch.ops.ddetr_tutorial.ms_deform_attn
BACKWARD = torch.ops.ddetr_tutorial.ms_deform_attn_backward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def leaves(args):
    """The inputs with value, locations and weights as fresh leaves that require grad."""
    args = [t.detach().clone() for t in args]
    for i in (0, 3, 4):
        args[i].requires_grad_()
    return args


def test_schema_is_defined_at_import_and_kernels_at_load():
    schema = str(OP.default._schema)
    assert schema.startswith("ddetr_tutorial::ms_deform_attn(Tensor value, Tensor spatial_shapes")
    assert str(BACKWARD.default._schema).endswith("-> (Tensor, Tensor, Tensor)")
    loader.load_extension("cpu")
    for name in ("ddetr_tutorial::ms_deform_attn", "ddetr_tutorial::ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta"), name  # the fake
    assert torch._C._dispatch_has_kernel_for_dispatch_key("ddetr_tutorial::ms_deform_attn",
                                                          "Autograd")


def test_fake_tensors_give_shapes_and_dtypes():
    with torch._subclasses.FakeTensorMode():
        value = torch.empty(2, 75, 2, 4)
        loc, attn = torch.empty(2, 3, 2, 2, 2, 2), torch.empty(2, 3, 2, 2, 2)
        ss, starts = torch.empty(2, 2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
        out = OP(value, ss, starts, loc, attn)
        grads = BACKWARD(value, ss, starts, loc, attn, torch.empty(2, 3, 8))
    assert out.shape == (2, 3, 8) and out.dtype == value.dtype
    assert [g.shape for g in grads] == [value.shape, loc.shape, attn.shape]


def test_double_backward_is_an_error():
    args = leaves(make_inputs(SHAPES["non_square"], N=1, Lq=2, M=1, D=2, K=1))
    out = ms_deform_attn(*args, backend="cpu")
    grad_loc, = torch.autograd.grad(out.sum(), args[3], create_graph=True)
    with pytest.raises(RuntimeError, match="ms_deform_attn is differentiable once"):
        grad_loc.sum().backward()


def test_hessian_through_the_cpu_kernel_is_an_error():
    """Second derivatives are not silently zero: the Hessian of a loss in the sampling
    locations, non-zero by the reference, raises through the compiled kernel."""
    value, ss, starts, loc, attn = make_inputs(SHAPES["non_square"], N=1, Lq=2, M=1, D=2, K=1)

    def loss(locations, backend="cpu"):
        return (ms_deform_attn(value, ss, starts, locations, attn, backend=backend) ** 2).sum()

    true = torch.autograd.functional.hessian(lambda x: loss(x, "pytorch"), loc)
    assert true.abs().max() > 0  # the reference's Hessian, what zeros would hide
    with pytest.raises(RuntimeError, match="ms_deform_attn is differentiable once"):
        torch.autograd.functional.hessian(loss, loc.detach().clone())


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(backend, dtype):
    loader.load_extension(backend)
    args = make_inputs(SHAPES["non_square"], N=2, Lq=3, M=2, D=4, K=2, dtype=dtype,
                       device=device_of(backend), seed=1, away_from_edges=True)
    torch.library.opcheck(OP, leaves(args))
    grad_output = torch.randn(2, 3, 8, dtype=dtype, device=device_of(backend))
    torch.library.opcheck(BACKWARD, [*args, grad_output])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loc_dtype", ["same", torch.float32])
def test_opcheck_cuda_half(dtype, loc_dtype):
    """Half value with locations and weights in its dtype or float32: gradients keep
    their input dtypes."""
    loader.load_extension("cuda")
    value, ss, starts, loc, attn = make_inputs(SHAPES["non_square"], N=2, Lq=3, M=2, D=8, K=2,
                                               dtype=torch.float32, device="cuda", seed=2,
                                               away_from_edges=True)
    loc_dtype = dtype if loc_dtype == "same" else loc_dtype
    args = [value.to(dtype), ss, starts, loc.to(loc_dtype), attn.to(loc_dtype)]
    torch.library.opcheck(OP, leaves(args))
    grads = BACKWARD(*args, torch.randn(2, 3, 16, device="cuda", dtype=dtype))
    assert [g.dtype for g in grads] == [dtype, loc_dtype, loc_dtype]


def graph_recorder(graphs):
    """An aot_eager-like backend that keeps the forward and backward graphs it runs."""
    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler
    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def calls(graph_module):
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


def module_inputs(levels, N=2, Lq=7, C=16, host_levels=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in levels)
    if host_levels:
        ss, starts = level_tensors(levels)
    else:
        ss = torch.tensor(levels)
        starts = torch.cat([ss.new_zeros(1), ss.prod(1).cumsum(0)[:-1]])
    return (torch.randn(N, Lq, C, generator=g), torch.rand(N, Lq, len(levels), 2, generator=g),
            torch.randn(N, S, C, generator=g), ss, starts)


def forward_and_grads(module, inputs):
    query, ref, x, ss, starts = (t.detach().clone() for t in inputs)
    query.requires_grad_()
    x.requires_grad_()
    out = module(query, ref, x, ss, starts)
    module.zero_grad()
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out, query.grad, x.grad] + [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("host_levels", [True, False], ids=["level_tensors", "plain_tensors"])
def test_compiled_module_traces_the_op_and_matches_eager(host_levels):
    torch.manual_seed(0)
    levels = [(6, 10), (3, 5)]
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, backend="cpu")
    inputs = module_inputs(levels, host_levels=host_levels)
    eager = forward_and_grads(module, inputs)
    graphs = {}
    compiled = torch.compile(module, fullgraph=True, backend=graph_recorder(graphs))
    traced = forward_and_grads(compiled, inputs)
    assert "ddetr_tutorial.ms_deform_attn.default" in calls(graphs["forward"])
    assert "ddetr_tutorial.ms_deform_attn_backward.default" in calls(graphs["backward"])
    for got, want in zip(traced, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_compiled_auto_backend_is_the_cpu_kernel(monkeypatch):
    monkeypatch.delenv("DDETR_BACKEND", raising=False)
    args = make_inputs(SHAPES["with_1x1"], N=1, Lq=4, M=2, D=3, K=2, dtype=torch.float32)
    graphs = {}
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend=graph_recorder(graphs))
    torch.testing.assert_close(compiled(*args), ms_deform_attn(*args, backend="cpu"),
                               rtol=0, atol=0)
    assert "ddetr_tutorial.ms_deform_attn.default" in calls(graphs["forward"])


def test_compiled_checks_keep_the_shape_errors():
    value, ss, starts, loc, attn = make_inputs(SHAPES["four_levels"], N=2, D=4)
    compiled = torch.compile(ms_deform_attn, fullgraph=True, backend="aot_eager")
    # The check runs while tracing; fullgraph reports it as dynamo's Unsupported
    # error, which carries our message.
    with pytest.raises(RuntimeError, match="value has M=2 heads but sampling_locations has M=1"):
        compiled(value, ss, starts, loc[:, :, :1], attn[:, :, :1], backend="cpu")


def test_inductor_runs_the_op_forward_and_backward():
    args = make_inputs(SHAPES["non_square"], N=2, Lq=3, M=2, D=4, K=2, dtype=torch.float32,
                       seed=3, away_from_edges=True)
    grad_output = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(4))

    def run(fn):
        inputs = leaves(args)
        out = fn(*inputs)
        out.backward(grad_output)
        return [out] + [inputs[i].grad for i in (0, 3, 4)]

    def op(*a):
        return ms_deform_attn(*a, backend="cpu")

    eager = run(op)
    compiled = run(torch.compile(op, fullgraph=True, backend="inductor"))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
