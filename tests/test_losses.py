"""GDKD and RCKA against independent fp64 references written here from METHOD.md section 3."""

from __future__ import annotations

import math

import pytest
import torch

from grace_quant.losses import (
    cka,
    decoupled_kd,
    entropy_gate,
    gated_dkd_loss,
    kd_loss,
    llava_tokens_per_image,
    qwen2vl_tokens_per_image,
    relational_cka_loss,
)

# --------------------------------------------------------------------------------------------------
# fp64 references: probabilities first, logs last, no masking tricks
# --------------------------------------------------------------------------------------------------


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


def ref_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def ref_tckd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    pt, ps = ref_probs(t, temperature), ref_probs(s, temperature)
    pt_y, ps_y = pt.gather(-1, y[..., None])[..., 0], ps.gather(-1, y[..., None])[..., 0]
    return ref_kl(torch.stack([pt_y, 1 - pt_y], -1), torch.stack([ps_y, 1 - ps_y], -1))


def ref_nckd(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    """Delete column y from the probabilities and renormalise what is left."""
    vocab = s.shape[-1]
    pt, ps = ref_probs(t, temperature).reshape(-1, vocab), ref_probs(s, temperature).reshape(-1, vocab)
    keep = torch.ones_like(pt, dtype=torch.bool)
    keep[torch.arange(pt.shape[0]), y.reshape(-1)] = False
    pt_hat, ps_hat = pt[keep].view(-1, vocab - 1), ps[keep].view(-1, vocab - 1)
    pt_hat, ps_hat = pt_hat / pt_hat.sum(-1, keepdim=True), ps_hat / ps_hat.sum(-1, keepdim=True)
    return ref_kl(pt_hat, ps_hat).reshape(y.shape)


def ref_gate(t: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(t.double(), dim=-1)
    entropy = -(p * p.log()).sum(-1)
    return torch.exp(-entropy / math.log(t.shape[-1]))


def ref_gated_loss(s, t, labels, temperature=2.0, alpha=1.0, beta_dkd=4.0, gate=True):
    """Loop over positions: logits at j predict labels[j + 1]; returns (sum g L / sum g, sum g, n)."""
    weighted, gates = [], []
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1] - 1):
            y = labels[b, j + 1]
            if y == -100:
                continue
            sj, tj = s[b, j].double(), t[b, j].double()
            loss = temperature**2 * (
                alpha * ref_tckd(sj, tj, y, temperature) + beta_dkd * ref_nckd(sj, tj, y, temperature)
            )
            g = ref_gate(tj) if gate else torch.ones((), dtype=torch.float64)
            weighted.append(g * loss)
            gates.append(g)
    return torch.stack(weighted).sum() / torch.stack(gates).sum(), torch.stack(gates).sum(), len(gates)


def ref_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Explicit centring matrix H = I - 11^T/n on cosine Grams."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n

    def centred(f):
        v = f.double() / f.double().norm(dim=1, keepdim=True)
        return h @ (v @ v.T) @ h

    kx, ky = centred(x), centred(y)
    return (kx * ky).sum() / (kx.norm() * ky.norm())


def random_batch(batch=3, seq=9, vocab=17, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (2 * torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    t = (2 * torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < 0.3] = -100
    labels[0, 1] = 5  # at least one supervised token
    return s, t, labels


# --------------------------------------------------------------------------------------------------
# Per-token DKD
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_dkd_identity_tckd_plus_weighted_nckd_is_kl(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = 3 * torch.randn(40, 23, generator=g, dtype=torch.float64), 3 * torch.randn(40, 23, generator=g).double()
    y = torch.randint(0, 23, (40,), generator=g)
    tckd, nckd, _ = decoupled_kd(s, t, y, temperature)
    pt, ps = ref_probs(t, temperature), ref_probs(s, temperature)
    pt_y = pt.gather(-1, y[:, None])[:, 0]
    full_kl = ref_kl(pt, ps)
    torch.testing.assert_close(tckd + (1 - pt_y) * nckd, full_kl, rtol=1e-10, atol=1e-12)
    # and the same identity holds for the references themselves
    torch.testing.assert_close(
        ref_tckd(s, t, y, temperature) + (1 - pt_y) * ref_nckd(s, t, y, temperature), full_kl, rtol=1e-10, atol=1e-12
    )


def test_tckd_nckd_match_direct_fp64_computation():
    g = torch.Generator().manual_seed(2)
    s, t = 2 * torch.randn(4, 5, 31, generator=g).double(), 2 * torch.randn(4, 5, 31, generator=g).double()
    y = torch.randint(0, 31, (4, 5), generator=g)
    tckd, nckd, loss = decoupled_kd(s, t, y, 2.0, alpha=0.7, beta_dkd=3.0)
    torch.testing.assert_close(tckd, ref_tckd(s, t, y, 2.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(nckd, ref_nckd(s, t, y, 2.0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, 4.0 * (0.7 * tckd + 3.0 * nckd))
    assert tckd.shape == y.shape and (tckd > 0).all() and (nckd > 0).all()


def test_dkd_fp32_and_bf16_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    y = torch.randint(0, 50, (6,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        s_d, t_d = s.to(dtype), t.to(dtype)
        tckd, nckd, _ = decoupled_kd(s_d, t_d, y, 2.0)
        assert tckd.dtype == torch.float32 and nckd.dtype == torch.float32
        torch.testing.assert_close(tckd.double(), ref_tckd(s_d, t_d, y, 2.0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(nckd.double(), ref_nckd(s_d, t_d, y, 2.0), rtol=1e-4, atol=1e-6)


def test_dkd_is_finite_for_a_certain_teacher_and_minus_inf_logits():
    vocab = 40
    t = torch.zeros(3, vocab)
    y = torch.tensor([0, 1, 2])
    t[torch.arange(3), y] = 200.0  # pT(y) == 1 in fp32: 1 - pT(y) underflows
    t[:, -5:] = float("-inf")  # e.g. padded vocabulary entries
    s = torch.randn(3, vocab, requires_grad=True)
    tckd, nckd, loss = decoupled_kd(s, t, y, 1.0)
    loss.sum().backward()
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all() and (tckd >= 0).all() and (nckd >= 0).all()
    assert torch.isfinite(s.grad).all()
    # with a certain teacher TCKD reduces to -log pS(y)
    torch.testing.assert_close(tckd, -torch.log_softmax(s.detach(), -1)[torch.arange(3), y])


def test_tckd_is_accurate_for_a_confident_fp32_student():
    """pS(y) rounds to 1 in fp32, yet 1 - pS(y) ~ 1e-12 must still enter TCKD through its log."""
    g = torch.Generator().manual_seed(15)
    s, t = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g)
    y = torch.randint(0, 50, (5,), generator=g)
    s[torch.arange(5), y] += 30.0
    assert (torch.softmax(s, -1)[torch.arange(5), y] == 1.0).all()
    tckd, nckd, _ = decoupled_kd(s, t, y, 1.0)
    torch.testing.assert_close(tckd.double(), ref_tckd(s, t, y, 1.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nckd.double(), ref_nckd(s, t, y, 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_is_t2_kl(temperature):
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 19, generator=g).double(), torch.randn(2, 3, 19, generator=g).double()
    expected = temperature**2 * ref_kl(ref_probs(t, temperature), ref_probs(s, temperature))
    torch.testing.assert_close(kd_loss(s, t, temperature), expected, rtol=1e-10, atol=1e-12)


def test_mismatched_vocab_raises_naming_both_sizes():
    s, t, y = torch.randn(2, 11), torch.randn(2, 13), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"11.*13"):
        decoupled_kd(s, t, y)
    with pytest.raises(ValueError, match=r"11.*13"):
        kd_loss(s, t)
    with pytest.raises(ValueError, match=r"11.*13"):
        gated_dkd_loss(s[None], t[None], torch.zeros(1, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Entropy gate
# --------------------------------------------------------------------------------------------------


def test_gate_matches_reference_and_lies_in_range():
    g = torch.Generator().manual_seed(5)
    t = 3 * torch.randn(200, 37, generator=g).double()
    gate = entropy_gate(t)
    torch.testing.assert_close(gate, ref_gate(t), rtol=1e-10, atol=1e-12)
    assert (gate >= math.exp(-1) - 1e-12).all() and (gate <= 1 + 1e-12).all()


def test_gate_extremes_peaked_is_one_uniform_is_inv_e():
    vocab = 101
    peaked = torch.zeros(4, vocab)
    peaked[:, 7] = 1000.0
    assert torch.allclose(entropy_gate(peaked), torch.ones(4), atol=1e-6)
    assert torch.allclose(entropy_gate(torch.zeros(4, vocab)), torch.full((4,), math.exp(-1)), atol=1e-6)


def test_gate_decreases_as_the_teacher_gets_hotter():
    base = torch.randn(64, generator=torch.Generator().manual_seed(6)).double()
    temperatures = torch.tensor([0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0], dtype=torch.float64)
    gates = entropy_gate(base[None] / temperatures[:, None])
    assert (gates[1:] < gates[:-1]).all(), gates
    assert gates[0] > 0.9 and gates[-1] < math.exp(-1) + 0.01


def test_gate_has_no_gradient():
    t = torch.randn(3, 9, requires_grad=True)
    assert not entropy_gate(t).requires_grad


# --------------------------------------------------------------------------------------------------
# Gated DKD over a batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_gated_loss_and_gradient_match_fp64_reference(chunk_size, gate):
    s, t, labels = random_batch()
    s_ours, s_ref = s.clone().requires_grad_(), s.clone().requires_grad_()
    out = gated_dkd_loss(s_ours, t, labels, temperature=2.0, alpha=1.0, beta_dkd=4.0, gate=gate, chunk_size=chunk_size)
    expected, gate_sum, n = ref_gated_loss(s_ref, t, labels, gate=gate)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.gate_sum, gate_sum.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.weighted_sum, expected.detach() * gate_sum.detach(), rtol=1e-10, atol=1e-12)
    assert out.num_tokens == n == int((labels[:, 1:] != -100).sum())
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(s_ours.grad, s_ref.grad, rtol=1e-9, atol=1e-12)
    assert s_ours.grad.abs().sum() > 0


def test_gate_off_is_the_plain_mean_and_logging_means_are_gated():
    s, t, labels = random_batch(seed=7)
    b, j = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    y = labels[b, j + 1]
    tckd, nckd = ref_tckd(s[b, j], t[b, j], y, 2.0), ref_nckd(s[b, j], t[b, j], y, 2.0)
    per_token = 4.0 * (tckd + 4.0 * nckd)
    off = gated_dkd_loss(s, t, labels, gate=False)
    torch.testing.assert_close(off.loss, per_token.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(off.gate_mean, torch.tensor(1.0, dtype=torch.float64))
    g = ref_gate(t[b, j])
    on = gated_dkd_loss(s, t, labels, gate=True, chunk_size=4)
    torch.testing.assert_close(on.tckd, (g * tckd).sum() / g.sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(on.nckd, (g * nckd).sum() / g.sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(on.gate_mean, g.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(on.gate_min, g.min(), rtol=1e-10, atol=1e-12)  # the spread, over every chunk
    torch.testing.assert_close(on.gate_max, g.max(), rtol=1e-10, atol=1e-12)
    assert on.gate_min < on.gate_mean < on.gate_max
    assert not torch.allclose(on.loss, off.loss)


def test_chunk_sizes_agree_in_fp32():
    s, t, labels = random_batch(batch=2, seq=20, vocab=33, seed=8, dtype=torch.float32)
    results = []
    for chunk_size in (1, 7, 4096):
        s_leaf = s.clone().requires_grad_()
        out = gated_dkd_loss(s_leaf, t, labels, chunk_size=chunk_size)
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and s_leaf.grad.dtype == torch.float32
        results.append((out.loss.detach(), s_leaf.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


def test_causal_shift_last_logits_and_first_label_do_not_matter():
    s, t, labels = random_batch(seed=9)
    base = gated_dkd_loss(s, t, labels, chunk_size=5).loss

    s2, t2, labels2 = s.clone(), t.clone(), labels.clone()
    s2[:, -1] += 10 * torch.randn_like(s2[:, -1])
    t2[:, -1] += 10 * torch.randn_like(t2[:, -1])
    labels2[:, 0] = (labels2[:, 0] + 3) % s.shape[-1]
    torch.testing.assert_close(gated_dkd_loss(s2, t2, labels2, chunk_size=5).loss, base, rtol=0, atol=0)

    # positive control: logits at position j do matter when labels[j + 1] is supervised
    b, j = (labels[:, 1:] != -100).nonzero()[0].tolist()
    s3 = s.clone()
    s3[b, j] += 10 * torch.randn_like(s3[b, j])
    assert not torch.allclose(gated_dkd_loss(s3, t, labels, chunk_size=5).loss, base)


def test_ignored_positions_have_no_effect_and_no_gradient():
    s, t, labels = random_batch(seed=10)
    b, j = (labels[:, 1:] != -100).nonzero()[1].tolist()
    labels[b, j + 1] = -100
    s_leaf = s.clone().requires_grad_()
    out = gated_dkd_loss(s_leaf, t, labels, chunk_size=3)
    out.loss.backward()
    assert s_leaf.grad[b, j].abs().max() == 0
    assert (s_leaf.grad[:, -1] == 0).all()
    s2 = s.clone()
    s2[b, j] += 10.0 * torch.randn_like(s2[b, j])
    torch.testing.assert_close(gated_dkd_loss(s2, t, labels, chunk_size=3).loss, out.loss.detach(), rtol=0, atol=0)


def test_raw_sums_aggregate_over_micro_batches():
    s, t, labels = random_batch(batch=4, seed=11)
    whole = gated_dkd_loss(s, t, labels)
    parts = [gated_dkd_loss(s[i : i + 2], t[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    aggregated = sum(p.weighted_sum for p in parts) / sum(p.gate_sum for p in parts)
    torch.testing.assert_close(aggregated, whole.loss, rtol=1e-12, atol=1e-12)
    assert sum(p.num_tokens for p in parts) == whole.num_tokens


def test_zero_supervised_tokens_gives_finite_zero_that_backpropagates():
    s, t, _ = random_batch(seed=12, dtype=torch.float32)
    labels = torch.full(s.shape[:2], -100)
    labels[:, 0] = 3  # the first label is never predicted
    s_leaf = s.clone().requires_grad_()
    out = gated_dkd_loss(s_leaf, t, labels)
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and out.loss.requires_grad
    (out.loss + out.tckd + out.nckd + out.gate_mean).backward()
    assert s_leaf.grad is not None and torch.isfinite(s_leaf.grad).all() and (s_leaf.grad == 0).all()


def test_only_the_student_receives_gradients():
    s, t, labels = random_batch(seed=13, dtype=torch.float32)
    s, t = s.requires_grad_(), t.requires_grad_()
    out = gated_dkd_loss(s, t, labels)
    out.loss.backward()
    assert t.grad is None and s.grad is not None
    for logged in (out.tckd, out.nckd, out.gate_mean, out.gate_sum):
        assert not logged.requires_grad


def test_no_gradient_work_under_no_grad(monkeypatch):
    s, t, labels = random_batch(seed=16)
    expected = gated_dkd_loss(s, t, labels, chunk_size=4).loss
    s = s.requires_grad_()

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.autograd.grad called under no_grad")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    with torch.no_grad():
        out = gated_dkd_loss(s, t, labels, chunk_size=4)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=0)


def test_bf16_logits_give_fp32_loss_and_bf16_gradients_close_to_reference():
    s, t, labels = random_batch(batch=2, seq=8, vocab=64, seed=14, dtype=torch.bfloat16)
    s_leaf, s_ref = s.clone().requires_grad_(), s.double().requires_grad_()
    out = gated_dkd_loss(s_leaf, t, labels, chunk_size=3)
    out.loss.backward()
    expected, _, _ = ref_gated_loss(s_ref, t.double(), labels)
    expected.backward()
    assert out.loss.dtype == torch.float32 and s_leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_leaf.grad.double(), s_ref.grad, rtol=2e-2, atol=1e-4)


def test_shape_errors():
    s, t, labels = random_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="labels"):
        gated_dkd_loss(s, t, labels[:, :-1])
    with pytest.raises(ValueError, match="same shape"):
        gated_dkd_loss(s, t[:, :-1], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_dkd_loss(s, t, labels, chunk_size=0)


# --------------------------------------------------------------------------------------------------
# CKA
# --------------------------------------------------------------------------------------------------


def _features(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_matches_explicit_centring_reference():
    for seed, (n, ds, dt) in enumerate([(4, 3, 5), (10, 16, 48), (33, 8, 8)]):
        x, y = _features(n, ds, seed), _features(n, dt, seed + 100)
        torch.testing.assert_close(cka(x, y), ref_cka(x, y), rtol=1e-10, atol=1e-12)
    x32, y32 = x.float(), y.float()
    value = cka(x32, y32)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), ref_cka(x32, y32), rtol=1e-5, atol=1e-6)


def test_cka_is_one_for_identical_features():
    x = _features(12, 16, 0)
    torch.testing.assert_close(cka(x, x), torch.tensor(1.0, dtype=torch.float64))


def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling():
    x, y = _features(20, 16, 1), _features(20, 24, 2)
    base = cka(x, y)
    assert base < 0.9  # unrelated features: the invariances below are not trivially 1 == 1
    q, _ = torch.linalg.qr(_features(16, 16, 3))
    torch.testing.assert_close(cka(x @ q, y), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cka(3.7 * x, 0.2 * y), base, rtol=1e-10, atol=1e-12)


def test_cka_is_one_for_an_orthogonal_embedding_into_a_wider_space():
    student = _features(15, 16, 4)
    embed, _ = torch.linalg.qr(_features(48, 16, 5))  # 48 x 16 with orthonormal columns
    teacher = student @ embed.T
    assert teacher.shape == (15, 48)
    torch.testing.assert_close(cka(student, teacher), torch.tensor(1.0, dtype=torch.float64))
    assert cka(student, _features(15, 48, 6)) < 0.9


def test_cka_lies_in_unit_interval():
    g = torch.Generator().manual_seed(7)
    for _ in range(30):
        n, ds, dt = (int(v) for v in torch.randint(4, 30, (3,), generator=g))
        x = torch.randn(n, ds, generator=g)
        y = x @ torch.randn(ds, dt, generator=g) + torch.rand(()) * torch.randn(n, dt, generator=g)
        value = cka(x, y)
        assert 0.0 <= value.item() <= 1.0 + 1e-6


def test_cka_skips_too_few_tokens_and_degenerate_grams():
    assert cka(_features(3, 8, 8), _features(3, 8, 9)) is None
    assert cka(_features(4, 8, 8), _features(4, 8, 9)) is not None
    same_direction = (torch.rand(10, 1, dtype=torch.float64) + 0.5) * _features(1, 8, 10)  # parallel rows
    assert cka(same_direction, _features(10, 8, 11)) is None
    assert cka(_features(10, 8, 11), same_direction) is None
    with pytest.raises(ValueError, match="tokens"):
        cka(_features(5, 8, 0), _features(6, 8, 0))


# --------------------------------------------------------------------------------------------------
# Relational CKA over a batch
# --------------------------------------------------------------------------------------------------


def _two_sample_batch(seed=0, d_s=16, d_t=40):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 14, d_s, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 14, d_t, generator=g, dtype=torch.float64)
    # correlate the teacher with the student so CKA is far from both 0 and 1
    teacher[..., :d_s] += 2 * student
    mask = torch.zeros(2, 14, dtype=torch.bool)
    mask[0, 2:8] = True  # image A: 6 tokens
    mask[1, 1:5] = True  # image B: 4 tokens
    mask[1, 7:12] = True  # image C: 5 tokens
    return student, teacher, mask


def test_relational_loss_splits_tokens_per_image():
    student, teacher, mask = _two_sample_batch()
    loss, count = relational_cka_loss(student, teacher, mask, [6, 4, 5])
    slices = [(0, slice(2, 8)), (1, slice(1, 5)), (1, slice(7, 12))]
    expected = torch.stack([1 - ref_cka(student[b, sl], teacher[b, sl]) for b, sl in slices]).mean()
    assert count == 3
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    # a different (wrong) split gives a different loss, so the split is really used
    wrong, _ = relational_cka_loss(student, teacher, mask, torch.tensor([5, 5, 5]))
    assert not torch.allclose(wrong, loss)


def test_relational_loss_skips_small_images_and_counts_the_rest():
    student, teacher, mask = _two_sample_batch(seed=1)
    mask[1, 1:5] = False
    mask[1, 1:4] = True  # image B now has 3 tokens: skipped
    loss, count = relational_cka_loss(student, teacher, mask, [6, 3, 5])
    expected = torch.stack(
        [1 - ref_cka(student[0, 2:8], teacher[0, 2:8]), 1 - ref_cka(student[1, 7:12], teacher[1, 7:12])]
    ).mean()
    assert count == 2
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_relational_loss_gradient_reaches_student_visual_tokens_only():
    student, teacher, mask = _two_sample_batch(seed=2)
    student, teacher = student.float().requires_grad_(), teacher.float().requires_grad_()
    loss, _ = relational_cka_loss(student, teacher, mask, [6, 4, 5])
    loss.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all()
    assert student.grad[mask].abs().sum() > 0 and (student.grad[~mask] == 0).all()


def test_relational_loss_with_no_usable_image_is_zero_and_backpropagates():
    student, teacher, mask = _two_sample_batch(seed=3)
    student = student.requires_grad_()
    mask[:] = False
    mask[0, :3] = True
    loss, count = relational_cka_loss(student, teacher, mask, [3])
    assert count == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()
    empty_loss, empty_count = relational_cka_loss(student, teacher, torch.zeros_like(mask), [])
    assert empty_count == 0 and empty_loss.item() == 0.0


def test_relational_loss_rejects_a_wrong_token_count():
    student, teacher, mask = _two_sample_batch()
    with pytest.raises(ValueError, match="15 visual tokens.*16"):
        relational_cka_loss(student, teacher, mask, [6, 4, 6])


def test_relational_loss_equals_one_minus_cka_for_one_image_and_is_zero_for_an_embedding():
    student, _, mask = _two_sample_batch(seed=4, d_s=16)
    embed, _ = torch.linalg.qr(_features(40, 16, 12))
    loss, count = relational_cka_loss(student, student @ embed.T, mask, [6, 4, 5])
    assert count == 3
    torch.testing.assert_close(loss, torch.tensor(0.0, dtype=torch.float64), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Tokens-per-image helpers
# --------------------------------------------------------------------------------------------------


def test_llava_tokens_per_image():
    image = 9
    ids = torch.tensor(
        [
            [1, 9, 9, 9, 9, 2, 3, 0],
            [1, 2, 3, 4, 5, 6, 7, 0],  # text only: no image
            [9, 9, 9, 9, 9, 9, 1, 0],
        ]
    )
    assert llava_tokens_per_image(ids, image) == [4, 6]
    assert llava_tokens_per_image(ids, image, num_images_per_sample=[1, 0, 2]) == [4, 3, 3]
    with pytest.raises(ValueError, match="sample 2"):
        llava_tokens_per_image(ids, image, num_images_per_sample=[1, 0, 4])
    with pytest.raises(ValueError, match="sample 1"):
        llava_tokens_per_image(ids, image, num_images_per_sample=2)
    with pytest.raises(ValueError, match="2 entries"):
        llava_tokens_per_image(ids, image, num_images_per_sample=[1, 1])


def test_qwen2vl_tokens_per_image():
    grid = torch.tensor([[1, 4, 6], [2, 8, 8], [1, 36, 52]])
    assert qwen2vl_tokens_per_image(grid, spatial_merge_size=2) == [1 * 4 * 6 // 4, 2 * 8 * 8 // 4, 36 * 52 // 4]
    assert qwen2vl_tokens_per_image(grid, spatial_merge_size=1) == [24, 128, 1872]


def test_supervised_rows_follow_the_causal_shift():
    from grace_quant.labels import IGNORE_INDEX, next_token_mask, supervised_rows

    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX, 8]])
    rows, targets = supervised_rows(labels)
    # logits at (b, t) predict labels[b, t + 1]: rows b * L + t for every supervised labels[b, t + 1]
    expected = [(b * 4 + t, int(labels[b, t + 1])) for b in range(2) for t in range(3) if labels[b, t + 1] != -100]
    assert list(zip(rows.tolist(), targets.tolist(), strict=True)) == expected == [(0, 5), (1, 6), (6, 8)]
    assert int(next_token_mask(labels).sum()) == len(expected)  # the label at t = 0 is never a target


def test_visual_tokens_of_llava_and_qwen2_vl_batches():
    from grace_quant.losses import image_token_id, visual_tokens
    from grace_quant.testing import tiny_inputs, tiny_model

    for name in ("llava", "qwen2-vl"):
        model = tiny_model(name)
        inputs = tiny_inputs(model, batch=3)
        token = model.config.image_token_index if name == "llava" else model.config.image_token_id
        assert image_token_id(model.config) == token
        mask, sizes = visual_tokens(model.config, inputs)
        assert torch.equal(mask, inputs["input_ids"] == token)
        assert sizes == [4, 4, 4]  # tiny models: 4 visual tokens per image, one image per sample
        assert visual_tokens(model.config, {"input_ids": inputs["input_ids"]}) == (None, [])
