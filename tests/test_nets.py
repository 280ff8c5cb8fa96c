"""Two-time networks and the flow-map wrapper: JVPs against central differences, per-sample independence,
sizes and argument errors."""

import pytest
import torch

from fmm.flowmap import FlowMap
from fmm.nets import TwoTimeMLP, TwoTimeUNet, make_network

F64 = torch.float64


def randomised(net: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fresh random weights everywhere (the zero-initialised output layers would make every JVP zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net.double()


def small_mlp():
    return TwoTimeMLP(dim=3, width=32, depth=2, emb_dim=16, time_scale=10.0)


def small_unet(dropout=0.0):
    return TwoTimeUNet(in_channels=2, image_size=8, channels=8, channel_mult=(1, 2), num_blocks=1,
                       attn_resolutions=(4,), dropout=dropout, heads=2, time_scale=10.0)


NETS = {"mlp": (small_mlp, (6, 3)), "unet": (small_unet, (3, 2, 8, 8))}


@pytest.fixture(params=list(NETS))
def case(request):
    build, shape = NETS[request.param]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=F64)
    s = 0.1 + 0.4 * torch.rand(shape[0], generator=g, dtype=F64)
    t = s + 0.3 * torch.rand(shape[0], generator=g, dtype=F64)
    return FlowMap(randomised(build())), s, t, x


def test_time_jvp_matches_central_differences(case):
    flow, s, t, x = case
    value, dt = flow.time_jvp(s, t, x)
    h = 1e-6
    fd = (flow(s, t + h, x) - flow(s, t - h, x)) / (2 * h)
    torch.testing.assert_close(value, flow(s, t, x))
    torch.testing.assert_close(dt, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


def test_eulerian_jvp_matches_central_differences(case):
    flow, s, t, x = case
    b = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    value, total = flow.eulerian_jvp(s, t, x, b)
    h = 1e-6
    fd = (flow(s + h, t, x + h * b) - flow(s - h, t, x - h * b)) / (2 * h)
    torch.testing.assert_close(total, fd, rtol=1e-6, atol=1e-6 * fd.abs().max().item())


def test_gradient_flows_through_the_time_jvp(case):
    """Reverse-over-forward: the LMD/LSD objectives backpropagate through d/dt X."""
    flow, s, t, x = case
    _, dt = flow.time_jvp(s, t, x)
    dt.pow(2).sum().backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_no_layer_mixes_batch_elements(case):
    flow, s, t, x = case
    alone = flow(s[:1], t[:1], x[:1])
    other = x.clone()
    other[1:] = 5 * torch.randn_like(other[1:])
    torch.testing.assert_close(flow(s, t, other)[:1], alone, rtol=1e-12, atol=1e-12)


def test_flow_map_is_identity_on_the_diagonal_and_velocity_is_the_diagonal_slope(case):
    flow, s, _, x = case
    torch.testing.assert_close(flow(s, s, x), x, rtol=0, atol=0)
    torch.testing.assert_close(flow.velocity(s, x), flow.slope(s, s, x))
    _, dt = flow.time_jvp(s, s, x)
    torch.testing.assert_close(dt, flow.velocity(s, x))  # tangent condition holds by construction


def test_untrained_map_is_the_identity():
    flow = FlowMap(TwoTimeMLP(dim=2, width=16, depth=1))
    x = torch.randn(5, 2)
    torch.testing.assert_close(flow(0.0, 1.0, x), x)


def test_dropout_runs_under_jvp():
    flow = FlowMap(randomised(small_unet(dropout=0.2))).train()
    x = torch.randn(2, 2, 8, 8, dtype=F64)
    _, dt = flow.time_jvp(torch.full((2,), 0.2, dtype=F64), torch.full((2,), 0.7, dtype=F64), x)
    assert torch.isfinite(dt).all()


def test_network_sizes_cover_cpu_tests_and_cifar():
    small = make_network("unet", in_channels=3, image_size=32, channels=32, channel_mult=[1, 2, 2], num_blocks=1,
                         attn_resolutions=[16])
    assert 0.8e6 < small.num_parameters() < 2e6
    cifar = make_network("unet", in_channels=3, image_size=32, channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                         attn_resolutions=[16], dropout=0.13)
    assert 50e6 < cifar.num_parameters() < 70e6
    assert make_network("mlp", dim=2, width=512, depth=4).num_parameters() > 1e6


def test_shape_mismatch_between_x_and_network_is_a_clear_error():
    flow = FlowMap(small_mlp())
    with pytest.raises(ValueError, match=r"TwoTimeMLP takes x of shape \[B, 3\]; got \(4, 2\)"):
        flow(0.0, 1.0, torch.zeros(4, 2))
    unet = FlowMap(small_unet())
    with pytest.raises(ValueError, match=r"TwoTimeUNet takes x of shape \[B, 2, 8, 8\]; got \(4, 2, 16, 16\)"):
        unet(0.0, 1.0, torch.zeros(4, 2, 16, 16))
    with pytest.raises(ValueError, match=r"s must be a scalar or a vector of shape \(4,\)"):
        flow(torch.zeros(3), 1.0, torch.zeros(4, 3))


def test_times_outside_unit_interval_are_refused():
    flow = FlowMap(small_mlp())
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*1.5"):
        flow(0.0, torch.tensor([0.5, 1.5]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"s must lie in \[0, 1\]"):
        flow.time_jvp(-0.5, 0.5, torch.zeros(2, 3))


@pytest.mark.parametrize("name,kwargs,match", [
    ("transformer", {}, r"unknown network 'transformer'; choose one of \['mlp', 'unet'\]"),
    ("mlp", {"dim": 2, "hidden": 64}, r"network 'mlp' takes .*got unknown \['hidden'\]"),
    ("mlp", {"dim": 0}, "dim must be a positive integer"),
    ("unet", {"image_size": 30, "channel_mult": [1, 2, 2]}, "divisible by 2"),
    ("unet", {"image_size": 32, "attn_resolutions": [12]}, r"attn_resolutions \[12\] match no level"),
])
def test_bad_network_configs_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_network(name, **kwargs)
