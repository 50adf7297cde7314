"""Diffusion wrapper: schedule matches diffusers/SD 1.5, targets, min-SNR weighting, masking, draws."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from loopy_model.diffusion import Diffusion, DiffusionConfig, timestep_buckets

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
V_ZT = DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True)


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_alphas_cumprod_is_sd15():
    d = Diffusion(DiffusionConfig())
    ref = DDPMScheduler(**SD15).alphas_cumprod
    assert d.alphas_cumprod.shape == (1000,)
    assert torch.equal(d.alphas_cumprod, ref)
    # sanity: SD 1.5 scaled-linear endpoints
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    assert 0.004 < d.alphas_cumprod[-1].item() < 0.005  # not zero-SNR: ab_T ~ 0.0047


def test_scheduler_config_builds_matching_schedulers():
    for cfg in (DiffusionConfig(), V_ZT):
        d = Diffusion(cfg)
        for cls in (DDPMScheduler, DDIMScheduler):
            s = cls(**d.scheduler_config())
            assert torch.equal(s.alphas_cumprod, d.alphas_cumprod)
            assert s.config.prediction_type == cfg.prediction_type
    ddim = DDIMScheduler(**Diffusion(V_ZT).scheduler_config())
    assert ddim.config.timestep_spacing == "trailing"
    ddim.set_timesteps(25)
    assert ddim.timesteps[0].item() == 999  # trailing: sampling starts at the zero-SNR step
    ddim = DDIMScheduler(**Diffusion(DiffusionConfig()).scheduler_config())
    ddim.set_timesteps(25)
    assert ddim.timesteps[0].item() == 961  # SD 1.5 "leading" + steps_offset 1


def test_add_noise_matches_diffusers():
    d = Diffusion(DiffusionConfig())
    x0, noise = torch.randn(4, 3, 4, 8, 8), torch.randn(4, 3, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    ours = d.add_noise(x0, noise, t)
    ref = DDPMScheduler(**SD15).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours.dtype == x0.dtype
    assert d.add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_target_matches_get_velocity(zero_snr):
    cfg = DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=zero_snr)
    d = Diffusion(cfg)
    x0, noise = torch.randn(3, 2, 4, 5, 5), torch.randn(3, 2, 4, 5, 5)
    t = torch.tensor([1, 400, 999])
    ref = DDPMScheduler(**d.scheduler_config()).get_velocity(x0, noise, t)
    torch.testing.assert_close(d.target(x0, noise, t), ref, rtol=1e-6, atol=1e-6)
    eps = Diffusion(DiffusionConfig())
    assert eps.target(x0, noise, t) is noise


def test_zero_terminal_snr():
    d = Diffusion(V_ZT)
    assert d.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    snr = d.snr(torch.tensor([0, 999]))
    assert snr[1].item() == 0.0 and snr[0].item() > 1000
    # at SNR 0, x_t is pure noise and v = -x0
    x0, noise = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t = torch.tensor([999])
    torch.testing.assert_close(d.add_noise(x0, noise, t), noise)
    torch.testing.assert_close(d.target(x0, noise, t), -x0)
    with pytest.raises(ValueError):
        DiffusionConfig(prediction_type="epsilon", zero_terminal_snr=True)


def test_snr_values():
    d = Diffusion(DiffusionConfig())
    t = torch.tensor([0, 500, 999])
    ab = DDPMScheduler(**SD15).alphas_cumprod[t]
    torch.testing.assert_close(d.snr(t), ab / (1 - ab))
    s = d.snr(torch.arange(1000))
    assert bool((s[1:] < s[:-1]).all())  # strictly decreasing


def test_min_snr_weights_at_known_t():
    t = torch.tensor([0, 500, 999])
    assert torch.equal(Diffusion(DiffusionConfig()).loss_weights(t), torch.ones(3))

    g = 5.0
    eps = Diffusion(DiffusionConfig(min_snr_gamma=g))
    snr = eps.snr(t)
    assert snr[0] > g > snr[1]  # t=0 is clipped, t=500 is not
    w = eps.loss_weights(t)
    torch.testing.assert_close(w[0], g / snr[0])
    assert w[1].item() == pytest.approx(1.0) and w[2].item() == pytest.approx(1.0)
    assert w[0].item() < 0.01  # SNR(0) ~ 1176: low-noise steps heavily down-weighted

    v = Diffusion(DiffusionConfig(prediction_type="v_prediction", zero_terminal_snr=True, min_snr_gamma=g))
    snr = v.snr(t)
    w = v.loss_weights(t)
    torch.testing.assert_close(w, torch.minimum(snr, torch.tensor(g)) / (snr + 1))
    torch.testing.assert_close(w[0], g / (snr[0] + 1))
    assert w[2].item() == 0.0  # SNR 0: min(0, g) / 1
    assert 0 < w[1].item() < 1


def test_weights_applied_per_sample_before_batch_mean():
    d = Diffusion(DiffusionConfig(min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 700, 999])
    target = torch.zeros(4, 3, 4, 4)
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(4, 1, 1, 1)
    pred = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * scale  # unequal errors
    loss, per_sample = d.loss(pred, target, t)
    mse = pred.square().flatten(1).mean(1)
    w = d.loss_weights(t)
    assert not torch.allclose(w, w[0])  # weights do differ across the batch
    torch.testing.assert_close(per_sample, w * mse)
    torch.testing.assert_close(loss, (w * mse).sum() / 4)
    hallo = w.mean() * mse.mean()  # the mean-first bug
    assert abs(loss.item() - hallo.item()) > 0.1 * loss.item()
    assert loss.dtype == torch.float32 and per_sample.shape == (4,)


def test_loss_gradient_flows_and_float32_on_bf16():
    d = Diffusion(DiffusionConfig())
    pred = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    loss, per_sample = d.loss(pred, torch.zeros_like(pred), torch.tensor([5, 6]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert per_sample.requires_grad and not per_sample.detach().requires_grad  # in the graph, detachable


def test_frame_mask_excludes_frames():
    d = Diffusion(DiffusionConfig())
    B, F = 2, 4
    target = torch.zeros(B, F, 4, 3, 3)
    pred = torch.ones(B, F, 4, 3, 3)
    pred[0, 3] = 100.0  # huge error in a masked frame
    pred[1, 0] = 3.0  # error 9 in a kept frame
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss, per_sample = d.loss(pred, target, torch.tensor([10, 20]), frame_mask=mask)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, (9.0 + 1.0) / 2]))
    torch.testing.assert_close(loss, per_sample.mean())
    unmasked, _ = d.loss(pred, target, torch.tensor([10, 20]))
    assert unmasked.item() > 100  # without the mask the masked frame dominates
    # a sample with no valid frames contributes 0
    _, ps = d.loss(pred, target, torch.tensor([10, 20]), frame_mask=torch.tensor([[False] * F, [True] * F]))
    assert ps[0].item() == 0.0


def test_draw_independent_of_batch_split():
    d = Diffusion(DiffusionConfig(noise_offset=0.05))
    x0 = torch.zeros(4, 4, 3, 8, 8)
    seeds = [11, 22, 33, 44]
    t, noise = d.draw(x0, gens(seeds))
    t_a, n_a = d.draw(x0[:2], gens(seeds[:2]))
    t_b, n_b = d.draw(x0[2:], gens(seeds[2:]))
    assert torch.equal(torch.cat([t_a, t_b]), t)
    assert torch.equal(torch.cat([n_a, n_b]), noise)
    assert t.dtype == torch.long and bool(((t >= 0) & (t < 1000)).all())
    assert noise.shape == x0.shape and noise.dtype == x0.dtype
    assert not torch.equal(noise[0], noise[1])  # different seeds, different noise
    t2, n2 = d.draw(x0, gens([99, 22, 33, 44]))  # changing one seed changes only that sample
    assert torch.equal(n2[1:], noise[1:]) and not torch.equal(n2[0], noise[0])
    assert d.draw(x0.bfloat16(), gens(seeds))[1].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        d.draw(x0, gens(seeds[:3]))


def test_draw_timesteps_cover_range():
    d = Diffusion(DiffusionConfig())
    t, _ = d.draw(torch.zeros(2000, 1), gens(range(2000)))
    assert t.min().item() < 20 and t.max().item() > 980
    assert 400 < t.float().mean().item() < 600


@pytest.mark.parametrize("channel_dim,shape", [(1, (3, 4, 2, 8, 8)), (2, (3, 2, 4, 8, 8))])
def test_noise_offset_is_per_sample_channel_constant(channel_dim, shape):
    x0 = torch.zeros(shape)
    seeds = [1, 2, 3]
    _, plain = Diffusion(DiffusionConfig()).draw(x0, gens(seeds), channel_dim=channel_dim)
    _, offset = Diffusion(DiffusionConfig(noise_offset=0.5)).draw(x0, gens(seeds), channel_dim=channel_dim)
    diff = (offset - plain).movedim(channel_dim, 1).flatten(2)  # [B, C, rest]
    assert torch.allclose(diff, diff[..., :1].expand_as(diff))  # constant over frames and pixels
    assert diff[..., 0].abs().min() > 0  # every (sample, channel) got an offset
    assert not torch.allclose(diff[:, 0, 0], diff[:, 1, 0])  # channels differ
    assert not torch.allclose(diff[0, :, 0], diff[1, :, 0])  # samples differ


def test_timestep_buckets():
    t = torch.tensor([0, 99, 100, 550, 999, 999])
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    b = timestep_buckets(t, losses, 1000)
    assert len(b) == 10 and list(b)[0] == "t000-099" and list(b)[-1] == "t900-999"
    assert b["t000-099"] == (3.0, 2)
    assert b["t100-199"] == (4.0, 1)
    assert b["t500-599"] == (8.0, 1)
    assert b["t900-999"] == (48.0, 2)
    assert b["t200-299"] == (0.0, 0)
    assert sum(c for _, c in b.values()) == 6
