"""The quantizer math against independent fp64 references and the LSQ gradient formula."""

import itertools

import pytest
import torch

from grace_quant.kernels import code_range, dequantize, pack
from grace_quant.modules import GraceQATLinear, GraceQuantLinear
from grace_quant.quant import fake_quantize, mse_scales, quantize_codes, scale_from_log


def reference_mse_scale(group: list[float], bits: int) -> tuple[float, float]:
    """fp64 brute force over the 20-point grid: (best scale, its squared error), first minimum on ties."""
    lo, hi = code_range(bits)
    absmax = max(abs(v) for v in group) or 1.0
    best = (None, float("inf"))
    for k in range(20):
        factor = 0.3 + (1.2 - 0.3) * k / 19
        s = factor * absmax / hi
        err = sum((v - s * min(max(round(v / s), lo), hi)) ** 2 for v in group)
        if err < best[1]:
            best = (s, err)
    return best


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_scales_reach_the_grid_optimum(bits):
    torch.manual_seed(0)
    weight = torch.randn(4, 64) * torch.rand(4, 1)
    weight[0, :32] = 0.0  # an all-zero group
    scales = mse_scales(weight, 32, bits)
    lo, hi = code_range(bits)
    for row, col in itertools.product(range(4), range(2)):
        group = weight[row, col * 32 : (col + 1) * 32].double()
        ref_scale, ref_err = reference_mse_scale(group.tolist(), bits)
        s = scales[row, col].double()
        err = float(((group - s * torch.clamp(torch.round(group / s), lo, hi)) ** 2).sum())
        assert err <= ref_err * (1 + 1e-5) + 1e-12
        assert s.item() == pytest.approx(ref_scale, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_equals_packed_dequant_bit_for_bit(dtype, bits):
    torch.manual_seed(1)
    weight = torch.randn(16, 128).to(dtype)
    log_scale = torch.log(mse_scales(weight, 32, bits)) + 0.01 * torch.randn(16, 4)
    fake = fake_quantize(weight, log_scale, 32, bits)
    scales = scale_from_log(log_scale, dtype)
    packed = pack(quantize_codes(weight, scales, 32, bits), bits)
    assert fake.dtype == dtype
    assert torch.equal(fake, dequantize(packed, scales, 32, bits))


def test_fake_quant_matches_fp64_definition():
    torch.manual_seed(2)
    weight = torch.randn(8, 64, dtype=torch.float64)
    log_scale = torch.randn(8, 2, dtype=torch.float64) * 0.1 - 2.0
    s = torch.exp(log_scale).repeat_interleave(32, dim=1)
    expected = s * torch.clamp(torch.round(weight / s), -8, 7)
    assert torch.allclose(fake_quantize(weight, log_scale, 32, 4), expected, rtol=0, atol=1e-12)


def test_gradients_follow_the_lsq_formula():
    """d w_hat / d w = 1 inside the range, 0 where clamped; d/d theta = s * (q - w/s) inside, s * (-Qn | Qp) outside."""
    torch.manual_seed(3)
    weight = (torch.randn(6, 64, dtype=torch.float64) * 0.5).requires_grad_()
    log_scale = torch.full((6, 2), -2.5, dtype=torch.float64, requires_grad=True)  # small scales: many clamps
    upstream = torch.randn(6, 64, dtype=torch.float64)
    (fake_quantize(weight, log_scale, 32, 4) * upstream).sum().backward()

    s = torch.exp(log_scale.detach()).repeat_interleave(32, dim=1)
    x = weight.detach() / s
    inside = (torch.round(x) >= -8) & (torch.round(x) <= 7)
    assert (~inside).any() and inside.any()
    expected_w = torch.where(inside, upstream, torch.zeros_like(upstream))
    d_ds = torch.where(inside, torch.round(x) - x, torch.clamp(torch.round(x), -8, 7))
    expected_theta = (upstream * d_ds * s).reshape(6, 2, 32).sum(-1)
    assert torch.allclose(weight.grad, expected_w, atol=1e-12)
    assert torch.allclose(log_scale.grad, expected_theta, rtol=1e-10, atol=1e-12)


def test_qat_and_packed_linears_compute_the_same_function():
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 24)
    qat = GraceQATLinear.from_linear(linear, group_size=32, bits=4)
    packed = GraceQuantLinear.from_qat(qat)
    x = torch.randn(3, 64)
    assert torch.equal(qat(x), packed(x))
    # the packed layer goes back to an equivalent QAT layer
    back = packed.to_qat()
    assert torch.equal(back.quantized_weight(), packed.dequantized_weight())


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="does not divide in_features=48"):
        fake_quantize(torch.randn(2, 48), torch.zeros(2, 1), 32, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_plain_autograd_through_a_detach_ste(dtype):
    """The custom backward (which recomputes w/s) equals autograd through the textbook STE composition."""
    torch.manual_seed(5)
    base = (torch.randn(8, 64) * 0.4).to(dtype)
    theta0 = torch.full((8, 2), -2.3)
    upstream = torch.randn(8, 64).to(dtype)

    def textbook(w, theta):
        s = torch.exp(theta).to(w.dtype).float().repeat_interleave(32, dim=1)
        x = w.float() / s
        q = torch.clamp(x + (torch.round(x) - x).detach(), -8, 7)  # round straight through, clamp ordinary
        return (q * s).to(w.dtype)

    grads = []
    for fn in (lambda w, t: fake_quantize(w, t, 32, 4), textbook):
        w, t = base.clone().requires_grad_(), theta0.clone().requires_grad_()
        (fn(w, t).float() * upstream.float()).sum().backward()
        grads.append((w.grad.float(), t.grad))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(grads[0][0], grads[1][0], atol=tol)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=tol, atol=tol)
