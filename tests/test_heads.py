"""DINOHead: reference layout and init, explicit weight normalisation equal to torch's weight_norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvtrain.models import DINOHead
from dvtrain.models.heads import WeightNormLinear

torch.set_num_threads(1)


def test_layout_names_and_shapes():
    head = DINOHead(48, 100, hidden_dim=64, bottleneck_dim=16)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert [tuple(head.mlp[i].weight.shape) for i in (0, 2, 4)] == [(64, 48), (64, 64), (16, 64)]
    params = {n: tuple(p.shape) for n, p in head.named_parameters() if n.startswith("last_layer")}
    assert params == {"last_layer.weight_g": (100, 1), "last_layer.weight_v": (100, 16)}  # no bias
    # ZeRO-3 safety: plain parameters, no weight_norm pre-hook, no parametrization
    assert not head.last_layer._forward_pre_hooks
    assert not hasattr(head.last_layer, "parametrizations")
    assert all(p.requires_grad for p in head.parameters())
    one = DINOHead(48, 10, bottleneck_dim=8, nlayers=1)
    assert [type(m) for m in one.mlp] == [nn.Linear] and one.mlp[0].weight.shape == (8, 48)
    two = DINOHead(48, 10, hidden_dim=32, bottleneck_dim=8, nlayers=2)
    assert [type(m) for m in two.mlp] == [nn.Linear, nn.GELU, nn.Linear]


def test_reference_init():
    head = DINOHead(384, 1000, hidden_dim=512, bottleneck_dim=256)
    for i in (0, 2, 4):
        assert abs(head.mlp[i].weight.std().item() - 0.02) < 0.001
        assert torch.count_nonzero(head.mlp[i].bias) == 0
    assert torch.equal(head.last_layer.weight_g, torch.ones(1000, 1))
    # weight_v: nn.Linear default, uniform(+-1/sqrt(256))
    v = head.last_layer.weight_v
    assert v.abs().max() <= 1 / 16 and v.abs().max() > 0.95 / 16
    torch.testing.assert_close(head.last_layer.weight().norm(dim=1), torch.ones(1000))


def test_equals_torch_weight_norm_forward_and_backward():
    torch.manual_seed(2)
    ours = WeightNormLinear(16, 40)
    with torch.no_grad():
        ours.weight_g.uniform_(0.5, 2.0)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(16, 40, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.weight_v)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), ref(x))
    (ours(x) ** 2).sum().backward()
    (ref(x) ** 2).sum().backward()
    torch.testing.assert_close(ours.weight_g.grad, ref.parametrizations.weight.original0.grad)
    torch.testing.assert_close(ours.weight_v.grad, ref.parametrizations.weight.original1.grad)


def test_forward_matches_hand_computation_and_is_bounded():
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(7, 24)
    z = head.mlp[4](F.gelu(head.mlp[2](F.gelu(head.mlp[0](x)))))
    z = z / z.norm(dim=1, keepdim=True)
    v = head.last_layer.weight_v
    expected = z @ (v / v.norm(dim=1, keepdim=True)).T
    out = head(x)
    torch.testing.assert_close(out, expected)
    assert out.shape == (7, 50)
    assert out.abs().max() <= 1 + 1e-6  # unit input, unit prototype rows, g = 1
    with torch.no_grad():
        head.last_layer.weight_g.fill_(3.0)  # the norm is g: logits scale with it
    torch.testing.assert_close(head(x), 3 * expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_output_dtype(dtype):
    head = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8).to(dtype)
    out = head(torch.randn(3, 24, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="nlayers must be >= 1"):
        DINOHead(8, 8, nlayers=0)
    with pytest.raises(ValueError, match="widths must be positive"):
        DINOHead(8, 0)
