"""The Loopy model (loopy_model/models/, tiny preset, CPU): shapes, parameter groups and gradients,
stage-1/stage-2 equivalence, reference drop checked on the attention inputs, motion-frame masks,
train/eval and gradient-checkpointing parity, SD 1.5 / AnimateDiff weight compatibility, and the
save/load round trip. Every component is real (no mocks); attention inputs are observed by wrapping
``torch.nn.functional.scaled_dot_product_attention`` with a recorder that calls the real one.
"""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

from loopy_model.models import A2L_CONDITIONS, LoopyContext, LoopyModel, parameter_groups
from loopy_model.models import processors
from loopy_model.models.blocks import LoopyTransformer2DModel
from loopy_model.models.loopy import GROUPS
from loopy_model.models.processors import ReferenceReadProcessor, spatial_self_attentions
from loopy_model.models.temporal import InterClipTemporalLayer, IntraClipTemporalLayer, temporal_layer_kwargs
from loopy_model.presets import SD15_UNET, TINY_UNET, preset

B, F, M = 2, 4, 4  # batch, target frames, motion latents (tiny preset)
LOOPY_DENOISER_PARTS = (".audio_attn.", ".inter_temporal.", ".intra_temporal.", ".class_embedding.")
STAGE1_TRAINABLE = {"denoiser", "reference", "text_context"}
STAGE2_TRAINABLE = {"denoiser", "reference", "text_context", "temporal", "audio", "a2l"}


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from intra-op threads, and on a shared 2-core machine the OpenMP
    threads of a busy neighbour make every small op wait (measured: 15 s with one thread vs ~290 s
    with two under load; 10 s with two on an idle machine). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(stage: int = 1, seed: int = 0) -> LoopyModel:
    torch.manual_seed(seed)
    return LoopyModel(stage=stage, audio_layers=3, audio_dim=4, **preset("tiny")["model"])


def stage2(seed: int = 0, perturb_scale: float = 0.0) -> LoopyModel:
    model = build(1, seed).to_stage2()
    if perturb_scale:
        perturb(model, perturb_scale, seed + 100)
    return model


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 123) -> None:
    """Add small noise to every parameter (the zero-initialised output layers become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def make_batch(b: int = B, f: int = F, m: int = M, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return dict(noisy_latents=r(b, f, 4, 16, 16), timesteps=torch.randint(0, 1000, (b,), generator=g),
                ref_latents=r(b, 4, 16, 16), motion_latents=r(b, m, 4, 16, 16),
                motion_mask=torch.ones(b, m, dtype=torch.bool), audio=r(b, f, 5, 3, 4),
                keypoints=r(b, f, 68, 3).tanh(), head_motion_var=r(b).abs() + 0.1,
                expression_var=r(b).abs() + 0.1, a2l_condition=torch.arange(b) % len(A2L_CONDITIONS))


def run(model: LoopyModel, batch: dict, **override) -> torch.Tensor:
    kw = {**batch, **override}
    x, t, ref = kw.pop("noisy_latents"), kw.pop("timesteps"), kw.pop("ref_latents")
    if model.config.stage == 1:  # stage 1 takes the reference and the condition masks only
        kw = {k: v for k, v in kw.items() if k == "ref_keep"}
    return model(x, t, ref, **kw)


def select(batch: dict, rows) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def keep(*flags: bool) -> torch.Tensor:
    return torch.tensor(flags, dtype=torch.bool)


def loss_of(out: torch.Tensor, seed: int = 7) -> torch.Tensor:
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out - target).square().mean()


def freeze_except(model: LoopyModel, trainable: set[str]) -> tuple[set[str], set[str]]:
    on, off = set(), set()
    for group, params in parameter_groups(model).items():
        for name, p in params:
            p.requires_grad_(group in trainable)
            (on if group in trainable else off).add(name)
    return on, off


def denoiser_alone_without_reference(model: LoopyModel, batch: dict) -> torch.Tensor:
    """The stage-1 denoiser with an empty ref_bank: plain self-attention, no reference at all."""
    x, t = batch["noisy_latents"], batch["timesteps"]
    b, f = x.shape[:2]
    ctx = LoopyContext(batch_size=b, num_frames=f)
    out = model.denoising_unet(x.flatten(0, 1), t.repeat_interleave(f),
                               encoder_hidden_states=model.text_context.expand(b * f, -1, -1),
                               cross_attention_kwargs={"loopy": ctx}).sample
    return out.view(x.shape)


def capture_contexts(model: LoopyModel) -> tuple[list[LoopyContext], object]:
    """The LoopyContext of every forward, read from the denoiser's call (a forward pre-hook)."""
    seen: list[LoopyContext] = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["cross_attention_kwargs"]["loopy"])

    return seen, model.denoising_unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Record (caller frame locals, q, k, v, attn_mask, codes on the stack) of every SDPA call."""
    real = processors.F.scaled_dot_product_attention
    calls: list[dict] = []

    def recorder(query, key, value, attn_mask=None, *args, **kwargs):
        frame, codes = sys._getframe(1), []
        caller_locals = dict(frame.f_locals)
        while frame is not None and len(codes) < 16:
            codes.append(frame.f_code)
            frame = frame.f_back
        calls.append(dict(q=query, k=key, v=value, mask=attn_mask, codes=codes, caller=caller_locals))
        return real(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(processors.F, "scaled_dot_product_attention", recorder)
    return calls


READ_CODE = ReferenceReadProcessor.__call__.__code__
INTER_CODE = InterClipTemporalLayer.forward.__code__


def read_calls(calls):
    return [c for c in calls if c["codes"][0] is READ_CODE]


def inter_calls(calls):
    return [c for c in calls if INTER_CODE in c["codes"]]


# ----------------------------------------------------------------------------- 1. shapes
@pytest.mark.parametrize("frames", [1, 4])
def test_stage1_shapes(frames):
    model = build(1)
    batch = make_batch(f=frames)
    with torch.no_grad():
        out = run(model, batch)
    assert out.shape == (B, frames, 4, 16, 16)
    assert torch.isfinite(out).all()
    assert not hasattr(model, "audio_proj") and not hasattr(model, "a2l")
    assert not any(b.has_loopy_layers for b in model.denoising_unet.modules()
                   if isinstance(b, LoopyTransformer2DModel))


def test_stage2_shapes_with_and_without_motion_and_every_a2l_condition():
    model = stage2(perturb_scale=0.05)  # non-zero A2L output FC, so the condition changes the output
    batch = make_batch()
    outs = []
    with torch.no_grad():
        for cond in range(len(A2L_CONDITIONS)):
            for motion in (True, False):
                over = dict(a2l_condition=torch.full((B,), cond))
                if not motion:
                    over.update(motion_latents=None, motion_mask=None)
                out = run(model, batch, **over)
                assert out.shape == (B, F, 4, 16, 16), (cond, motion)
                assert torch.isfinite(out).all(), (cond, motion)
                if motion:
                    outs.append(out)
        assert not torch.allclose(run(model, batch), run(model, batch, motion_latents=None, motion_mask=None))
        with pytest.raises(ValueError, match="audio"):
            run(model, batch, audio=None)
    for i in range(len(outs)):  # each A2L condition is a different query
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)


# ----------------------------------------------------------------------------- 2. parameter groups
@pytest.mark.parametrize("stage", [1, 2])
def test_every_parameter_in_exactly_one_group(stage):
    model = build(1) if stage == 1 else stage2()
    groups = parameter_groups(model)
    assert set(groups) == set(GROUPS)
    names = [n for params in groups.values() for n, _ in params]
    assert len(names) == len(set(names))
    own = dict(model.named_parameters())
    assert set(names) == set(own)
    for params in groups.values():
        for n, p in params:
            assert p is own[n]
    for g in ("denoiser", "reference", "reference_tail", "text_context"):
        assert groups[g], g
    for g in ("temporal", "audio", "a2l"):
        assert bool(groups[g]) == (stage == 2), g


def test_stage1_gradients_only_for_stage1_groups():
    model = build(1)
    trainable, frozen = freeze_except(model, STAGE1_TRAINABLE)
    assert frozen  # the ReferenceNet tail is frozen
    loss_of(run(model, make_batch(f=1))).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == trainable


def test_stage2_every_trainable_parameter_gets_a_gradient():
    model = stage2()
    trainable, frozen = freeze_except(model, STAGE2_TRAINABLE)
    loss_of(run(model, make_batch())).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert {n for n, g in grads.items() if g is not None} == trainable
    assert all(grads[n] is None for n in frozen)


def _nonzero_gradients() -> tuple[set[str], dict[str, float]]:
    """Stage-2 model with perturbed weights, a batch of 4 covering every A2L condition, every
    condition kept: (trainable names, name -> max |grad|)."""
    model = build(1).to_stage2()
    perturb(model, 0.05)
    trainable, _ = freeze_except(model, STAGE2_TRAINABLE)
    batch = make_batch(b=4)
    assert set(batch["a2l_condition"].tolist()) == set(range(len(A2L_CONDITIONS)))
    all_kept = torch.ones(4, dtype=torch.bool)
    loss_of(run(model, batch, ref_keep=all_kept, audio_keep=all_kept, motion_keep=all_kept)).backward()
    return trainable, {n: (p.grad.abs().max().item() if p.grad is not None else 0.0)
                       for n, p in model.named_parameters() if n in trainable}


NONZERO = 1e-10  # real gradients here are >= ~1e-6; round-off of a zero gradient is <= ~1e-13


def test_single_text_context_token_is_refused():
    """With one context token attn2's softmax is constant and its to_q/to_k could never learn."""
    config = {k: v for k, v in build(1).config.items() if not k.startswith("_")}
    with pytest.raises(ValueError, match="text_context_tokens"):
        LoopyModel(**{**config, "text_context_tokens": 1})


def test_stage2_every_trainable_parameter_gets_a_nonzero_gradient_with_perturbed_weights():
    trainable, grads = _nonzero_gradients()
    assert sorted(n for n in trainable if not grads[n] > NONZERO) == []


# ----------------------------------------------------------------------------- 3. stage 1 == fresh stage 2
def test_fresh_stage2_equals_stage1_frame_by_frame():
    m1 = build(1)
    perturb(m1, 0.05)
    m2 = m1.to_stage2()
    batch = make_batch(b=4)  # a2l_condition = 0, 1, 2, 3; motion latents, audio, keypoints, variances
    with torch.no_grad():
        expected = torch.cat([run(m1, batch, noisy_latents=batch["noisy_latents"][:, f:f + 1])
                              for f in range(F)], 1)
        out = run(m2, batch)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    first = next(b for b in m2.denoising_unet.modules() if isinstance(b, LoopyTransformer2DModel))
    zero_init = {
        "audio_attn": lambda m: m.audio_attn.attn.to_out[0].weight,
        "inter_temporal": lambda m: m.inter_temporal.proj_out.weight,
        "intra_temporal": lambda m: m.intra_temporal.proj_out.weight,
    }
    for name, weight_of in zero_init.items():
        assert not weight_of(first).any(), name
        saved = weight_of(first).detach().clone()
        with torch.no_grad():
            weight_of(first).normal_(0, 0.5)
            diff = (run(m2, batch) - expected).abs().max()
            weight_of(first).copy_(saved)
        assert diff > 1e-4, name
    emb = m2.denoising_unet.class_embedding  # A2L's output FC
    assert not emb.weight.any()
    with torch.no_grad():
        emb.weight.normal_(0, 0.5)
        assert (run(m2, batch) - expected).abs().max() > 1e-4


# ----------------------------------------------------------------------------- 4. reference drop
def test_reference_drop_stage1_removes_reference_only_for_dropped_sample():
    model = build(1)
    perturb(model, 0.05)
    batch = make_batch(f=2)
    with torch.no_grad():
        dropped = run(model, batch, ref_keep=keep(True, False))
        kept = run(model, batch, ref_keep=keep(True, True))
        alone = run(model, select(batch, slice(1, 2)), ref_keep=keep(False))
        no_reference = denoiser_alone_without_reference(model, select(batch, slice(1, 2)))
        other_ref = run(model, batch, ref_keep=keep(True, False), ref_latents=torch.randn(B, 4, 16, 16))
    torch.testing.assert_close(dropped[1], alone[0], atol=1e-5, rtol=0)  # batch size 1 vs 2: round-off
    torch.testing.assert_close(dropped[1], no_reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[0], kept[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(other_ref[1], dropped[1], atol=1e-6, rtol=0)  # reference unseen
    assert (dropped[1] - kept[1]).abs().max() > 1e-4  # the reference does matter when kept
    assert (other_ref[0] - dropped[0]).abs().max() > 1e-4


def test_reference_drop_stage2_sample_isolation():
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    with torch.no_grad():
        dropped = run(model, batch, ref_keep=keep(True, False))
        kept = run(model, batch, ref_keep=keep(True, True))
        alone = run(model, select(batch, slice(1, 2)), ref_keep=keep(False))
        other_ref = run(model, batch, ref_keep=keep(True, False), ref_latents=torch.randn(B, 4, 16, 16))
    torch.testing.assert_close(dropped[0], kept[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(other_ref[1], dropped[1], atol=1e-5, rtol=0)
    assert (dropped[1] - kept[1]).abs().max() > 1e-4


def test_reference_drop_stage2_motion_frames_have_no_influence():
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    other = batch["motion_latents"].clone()
    other[1] = torch.randn(M, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 3
    with torch.no_grad():
        dropped = run(model, batch, ref_keep=keep(True, False))
        changed = run(model, batch, ref_keep=keep(True, False), motion_latents=other)
    torch.testing.assert_close(changed[1], dropped[1], atol=1e-5, rtol=0)


def test_reference_drop_checked_on_attention_inputs(sdpa_calls):
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    contexts, handle = capture_contexts(model)
    n_layers = len(spatial_self_attentions(model.denoising_unet))
    h, w = 16, 16

    with torch.no_grad():
        run(model, batch, ref_keep=keep(True, False))
    ctx = contexts[-1]
    reads = read_calls(sdpa_calls)
    assert len(reads) == n_layers == len(ctx.ref_bank)
    assert sorted(c["caller"]["self"].layer_id for c in reads) == sorted(ctx.ref_bank)
    for call in reads:
        q, k, v, mask = call["q"], call["k"], call["v"], call["mask"]
        attn, layer = call["caller"]["attn"], call["caller"]["self"].layer_id
        ref = ctx.ref_bank[layer]  # [B, R, C]: the ReferenceNet's attn1 input of this layer
        own, n_ref = q.shape[2], ref.shape[1]
        assert q.shape[0] == k.shape[0] == B * F
        assert k.shape[2] == v.shape[2] == own + n_ref
        with torch.no_grad():  # the reference tokens are this sample's own, projected by this attn1
            ref_k = attn.to_k(ref).view(B, n_ref, attn.heads, -1).transpose(1, 2)
            ref_v = attn.to_v(ref).view(B, n_ref, attn.heads, -1).transpose(1, 2)
        for row in range(B * F):
            torch.testing.assert_close(k[row, :, own:], ref_k[row // F], atol=1e-6, rtol=0)
            torch.testing.assert_close(v[row, :, own:], ref_v[row // F], atol=1e-6, rtol=0)
        assert mask is not None and mask.dtype == torch.bool
        assert mask.shape == (B * F, 1, 1, own + n_ref)
        assert mask[..., :own].all()  # own tokens always visible
        assert mask[:F, ..., own:].all()  # sample 0 (kept): all its rows see the reference
        assert not mask[F:, ..., own:].any()  # sample 1 (dropped): none of its rows do

    # the motion frames are dropped with the reference: context mask and the inter-clip attention
    assert torch.equal(ctx.motion_keep, torch.stack([torch.ones(M, dtype=torch.bool),
                                                     torch.zeros(M, dtype=torch.bool)]))
    inters = inter_calls(sdpa_calls)
    assert len(inters) == 2 * n_layers  # attn1 + attn2 (double self-attention) of every inter layer
    for call in inters:
        q, mask = call["q"], call["mask"]
        assert q.shape[2] == call["k"].shape[2] == M + F
        assert mask is not None and mask.dtype == torch.bool and mask.shape[-1] == M + F
        mask = mask.expand(q.shape[0], q.shape[1], M + F, M + F)
        pixels = q.shape[0] // B  # rows are (sample, pixel)
        assert mask[:pixels].all()  # sample 0: all keys
        assert not mask[pixels:, ..., :M].any()  # sample 1: no motion-frame key
        assert mask[pixels:, ..., M:].all()  # sample 1: its current frames stay visible
    assert {call["q"].shape[0] // B for call in inters} <= {h * w, h * w // 4, h * w // 16}

    sdpa_calls.clear()
    with torch.no_grad():
        run(model, batch, ref_keep=keep(True, True))
    reads = read_calls(sdpa_calls)
    assert len(reads) == n_layers
    assert all(c["mask"] is None for c in reads)
    assert all(c["k"].shape[2] == 2 * c["q"].shape[2] for c in reads)
    assert all(c["mask"] is None for c in inter_calls(sdpa_calls))  # all motion slots kept
    handle.remove()


# ----------------------------------------------------------------------------- 5. motion_mask
def _motion_slot_change(model, batch, sample, slot, mask):
    other = batch["motion_latents"].clone()
    other[sample, slot] = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(9)) * 3
    with torch.no_grad():
        base = run(model, batch, motion_mask=mask)
        changed = run(model, batch, motion_mask=mask, motion_latents=other)
    return base, changed


def test_unmasked_motion_slot_influences_output():
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1] = False
    base, changed = _motion_slot_change(model, batch, 0, 2, mask)
    assert (changed[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(changed[1], base[1], atol=1e-6, rtol=0)  # no leak across samples


def test_motion_mask_reaches_inter_clip_attention(sdpa_calls):
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1] = False
    contexts, handle = capture_contexts(model)
    with torch.no_grad():
        run(model, batch, motion_mask=mask)
    handle.remove()
    assert torch.equal(contexts[-1].motion_keep, mask)
    inters = inter_calls(sdpa_calls)
    assert inters
    for call in inters:
        q, m = call["q"], call["mask"]
        m = m.expand(q.shape[0], q.shape[1], M + F, M + F)
        pixels = q.shape[0] // B
        assert not m[:pixels, ..., 1].any()
        assert m[:pixels, ..., [0, 2, 3]].all() and m[pixels:].all()


def test_masked_motion_slot_has_no_influence():
    model = stage2(perturb_scale=0.05)
    batch = make_batch()
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[0, 1] = False
    base, changed = _motion_slot_change(model, batch, 0, 1, mask)
    torch.testing.assert_close(changed, base, atol=1e-5, rtol=0)


def test_inter_clip_layer_masked_slot_has_no_influence():
    """The same leak, pinned to the layer itself."""
    torch.manual_seed(0)
    layer = InterClipTemporalLayer(**temporal_layer_kwargs(8, 2, 16, 4))
    perturb(layer, 0.1)
    x, motion = torch.randn(B * F, 8, 4, 4), torch.randn(B * M, 8, 4, 4)
    motion_keep = torch.ones(B, M, dtype=torch.bool)
    motion_keep[0, 1] = False
    other = motion.clone()
    other[1] = torch.randn(8, 4, 4) * 3  # sample 0, slot 1
    with torch.no_grad():
        torch.testing.assert_close(layer(x, other, F, motion_keep), layer(x, motion, F, motion_keep),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 6. train/eval, checkpointing
@pytest.mark.parametrize("stage", [1, 2])
def test_train_and_eval_forward_agree(stage):
    model = build(1) if stage == 1 else stage2(perturb_scale=0.05)
    batch = make_batch()
    with torch.no_grad():
        train_out = run(model.train(), batch, ref_keep=keep(True, False))
        eval_out = run(model.eval(), batch, ref_keep=keep(True, False))
    torch.testing.assert_close(train_out, eval_out, atol=1e-6, rtol=0)


def test_gradient_checkpointing_same_output_loss_and_gradients():
    plain = stage2(perturb_scale=0.05)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    loopy_blocks = [b for unet in (ckpt.reference_unet, ckpt.denoising_unet) for b in unet.modules()
                    if isinstance(b, LoopyTransformer2DModel)]
    assert loopy_blocks and all(b.gradient_checkpointing for b in loopy_blocks)
    for unet in (ckpt.reference_unet, ckpt.denoising_unet):
        flagged = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
        assert flagged and all(m.gradient_checkpointing for m in flagged)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.modules())

    def counted(model):  # calls of every intra-clip layer, the last Loopy layer of a block (a pre-hook:
        calls = []    # non-reentrant checkpointing stops recomputing once it has what backward needs)
        for m in model.modules():
            if isinstance(m, IntraClipTemporalLayer):
                m.register_forward_pre_hook(lambda *_: calls.append(1))
        return calls

    batch = make_batch(b=4)
    results = []
    for model in (plain, ckpt):
        model.train()
        calls = counted(model)
        out = run(model, batch, ref_keep=keep(True, False, True, True),
                  motion_keep=keep(True, True, False, True))
        loss = loss_of(out)
        forward_calls = len(calls)
        loss.backward()
        results.append((out.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                        forward_calls, len(calls)))
    (out0, loss0, g0, f0, t0), (out1, loss1, g1, f1, t1) = results
    assert f0 == t0 == f1 > 0  # no recompute without checkpointing
    assert t1 == 2 * f1  # the Loopy layers are recomputed in the backward pass
    torch.testing.assert_close(out1, out0, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None), n
        if g0[n] is not None:
            torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=0, msg=n)


# ----------------------------------------------------------------------------- 7. SD 1.5 U-Net weights
def _stock_unet_state_dict(seed: int = 3) -> dict:
    torch.manual_seed(seed)
    sd = UNet2DConditionModel(**TINY_UNET).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _is_loopy_denoiser_key(key: str) -> bool:
    return any(part in f".{key}" for part in LOOPY_DENOISER_PARTS)


@pytest.mark.parametrize("stage", [1, 2])
def test_official_unet_state_dict_loads_into_both_unets(stage):
    model = build(1) if stage == 1 else stage2()
    sd = _stock_unet_state_dict()
    loopy_before = {k: v.clone() for k, v in model.denoising_unet.state_dict().items() if _is_loopy_denoiser_key(k)}
    report = model.load_unet_weights(sd)
    assert report["reference_unet"] == []
    if stage == 1:
        assert report["denoising_unet"] == [] and not loopy_before
    else:
        expected = set(loopy_before)
        assert set(report["denoising_unet"]) == expected
        assert len(report["denoising_unet"]) == len(expected)
        for part in LOOPY_DENOISER_PARTS:  # each kind of Loopy module is there
            assert any(part in f".{k}" for k in expected), part
        for k, v in model.denoising_unet.state_dict().items():  # left at their initialisation
            if k in expected:
                assert torch.equal(v, loopy_before[k]), k
    for unet in (model.reference_unet, model.denoising_unet):
        own = unet.state_dict()
        assert {k for k in own if not _is_loopy_denoiser_key(k)} == set(sd)
        for k, v in sd.items():
            assert torch.equal(own[k], v), k

    missing = dict(sd)
    removed = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"
    del missing[removed]
    with pytest.raises(ValueError, match="missing"):
        model.load_unet_weights(missing)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_unet_weights({**sd, "down_blocks.0.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("stage", [1, 2])
def test_sd15_keys_and_shapes_match_paper_preset_on_meta(stage):
    with torch.device("meta"):
        stock = UNet2DConditionModel(**SD15_UNET)
        model = LoopyModel(stage=stage, **preset("paper")["model"])
    sd = stock.state_dict()
    assert len(sd) == 686  # SD 1.5's U-Net
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for unet in (model.reference_unet, model.denoising_unet):
        own = {k: tuple(v.shape) for k, v in unet.state_dict().items() if not _is_loopy_denoiser_key(k)}
        assert own == shapes
    report = model.load_unet_weights(sd)
    assert report["reference_unet"] == []
    assert bool(report["denoising_unet"]) == (stage == 2)
    assert all(_is_loopy_denoiser_key(k) for k in report["denoising_unet"])


# ----------------------------------------------------------------------------- 8. save / load
def test_save_pretrained_round_trip(tmp_path):
    model = stage2(perturb_scale=0.05)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded = LoopyModel.from_pretrained(tmp_path)
    assert loaded.config.stage == 2
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    batch = make_batch()
    with torch.no_grad():
        out_a = run(model.eval(), batch, ref_keep=keep(True, False))
        out_b = run(loaded.eval(), batch, ref_keep=keep(True, False))
    assert torch.equal(out_a, out_b)


# ----------------------------------------------------------------------------- 9. AnimateDiff parity
def test_intra_clip_layer_equals_animatediff_transformer3d():
    kwargs = temporal_layer_kwargs(8, 2, 16, 4)
    torch.manual_seed(0)
    ours = IntraClipTemporalLayer(**kwargs)
    x = torch.randn(B * F, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(ours(x, num_frames=F), x)  # zero-initialised output: identity
    perturb(ours, 0.1)
    stock = AnimateDiffTransformer3D(**kwargs)
    stock.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        out = ours(x, num_frames=F)
        torch.testing.assert_close(out, stock(x, num_frames=F), atol=1e-6, rtol=0)
    assert (out - x).abs().max() > 1e-3


def test_inter_clip_layer_equals_animatediff_over_motion_and_current_frames():
    kwargs = temporal_layer_kwargs(8, 2, 16, 4)
    torch.manual_seed(0)
    ours = InterClipTemporalLayer(**kwargs)
    perturb(ours, 0.1)
    stock = AnimateDiffTransformer3D(**kwargs)
    result = stock.load_state_dict(ours.state_dict(), strict=False)
    assert result.unexpected_keys == ["type_embedding"] and result.missing_keys == []
    x, motion = torch.randn(B * F, 8, 4, 4), torch.randn(B * M, 8, 4, 4)
    seq = torch.cat([motion.view(B, M, 8, 4, 4), x.view(B, F, 8, 4, 4)], 1).flatten(0, 1)
    with torch.no_grad():
        with_type = ours(x, motion, F)
        torch.testing.assert_close(ours(x, motion, F, torch.ones(B, M, dtype=torch.bool)), with_type,
                                   atol=0, rtol=0)
        ours.type_embedding.zero_()
        plain = ours(x, motion, F)
        expected = stock(seq, num_frames=M + F).view(B, M + F, 8, 4, 4)[:, M:].flatten(0, 1)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    assert (with_type - plain).abs().max() > 1e-4  # the type embedding is used


def test_motion_adapter_weights_load_into_intra_and_inter_layers():
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=4, motion_max_seq_length=16)
    perturb(adapter, 0.1)
    model = stage2()
    unet = model.denoising_unet
    pairs = [(adapter.down_blocks[i].motion_modules[j], unet.down_blocks[i].attentions[j])
             for i in range(2) for j in range(1)]
    pairs += [(adapter.mid_block.motion_modules[0], unet.mid_block.attentions[0])]
    pairs += [(adapter.up_blocks[i].motion_modules[j], unet.up_blocks[i].attentions[j])
              for i in range(2) for j in range(2)]
    assert len(pairs) == len(spatial_self_attentions(unet))
    for module, block in pairs:
        sd = module.state_dict()
        block.intra_temporal.load_state_dict(sd, strict=True)
        result = block.inter_temporal.load_state_dict(sd, strict=False)
        assert result.missing_keys == ["type_embedding"] and result.unexpected_keys == []
        for layer in (block.intra_temporal, block.inter_temporal):
            own = layer.state_dict()
            for k, v in sd.items():
                assert torch.equal(own[k], v), k
