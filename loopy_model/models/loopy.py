"""LoopyModel: ReferenceNet + denoising U-Net with Loopy's temporal, audio and A2L modules.

Paper 3.1: "The denoising network employs a Dual U-Net architecture [...] an additional reference
net module, which replicates the original SD U-Net structure but utilizes reference latents as
input. [...] the reference net also takes motion frames latents as input for feature extraction."

Both U-Nets are stock diffusers ``UNet2DConditionModel``s built from one config (SD 1.5's for the
``paper`` preset), with their spatial transformers constructed as ``LoopyTransformer2DModel``
(same parameter names) so the official SD 1.5 weights load into both with no missing or
unexpected keys (``load_unet_weights``). ``stage=1`` has no temporal, audio or A2L modules;
``stage=2`` adds them, every one zero-initialised on its output, so a stage-2 model loaded from a
stage-1 checkpoint computes exactly the stage-1 function until it trains.

The model holds no device, launcher or precision choices and samples no randomness: condition
masks (``conditions.py``) and noise (``diffusion.py``) come from outside, so the training and
evaluation forwards are the same function.
"""
from __future__ import annotations

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .a2l import AudioToLatents
from .audio import AudioProjModel
from .blocks import LoopyTransformer2DModel
from .context import LoopyContext
from .processors import install_processors

# Parameter groups (parameter_groups()); what trains in each stage is TrainConfig.trainable.
GROUPS = ("denoiser", "reference", "reference_tail", "text_context", "temporal", "audio", "a2l")


class LoopyModel(ModelMixin, ConfigMixin):
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet: dict, stage: int = 2, text_context_tokens: int = 77,
                 audio_layers: int = 13, audio_dim: int = 768, audio_window: int = 5,
                 audio_context_tokens: int = 32, audio_context_dim: int = 768, audio_proj_hidden: int = 512,
                 audio_heads: int = 8, temporal_heads: int = 8, temporal_max_frames: int = 32,
                 num_motion_latents: int = 20, num_keypoints: int = 68, a2l_dim: int = 256,
                 a2l_embeddings: int = 64, a2l_heads: int = 4, num_frames: int = 12, motion_stride: int = 4,
                 motion_expand_ratio: int = 2, motion_segments: int = 5, motion_mode: str = "uniform"):
        # num_frames and the temporal-segment settings (paper 4: 12 frames; s=4, r=2 over 124 frames
        # -> 20 motion latents) are the clip shapes the model is trained on; the loader and
        # autoregressive inference read them from here, so a checkpoint carries its own.
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        if num_motion_latents != motion_stride * motion_segments:
            raise ValueError(f"num_motion_latents {num_motion_latents} != motion_stride x motion_segments "
                             f"({motion_stride} x {motion_segments})")
        if num_motion_latents + num_frames > temporal_max_frames:
            raise ValueError(f"{num_motion_latents} motion + {num_frames} current frames exceed the temporal "
                             f"positional table ({temporal_max_frames})")
        unet = dict(unet)
        self.reference_unet = _build_unet(unet, "reference")
        if stage == 2:  # A2L's output FC is the U-Net's own class embedding (simple_projection)
            unet.update(class_embed_type="simple_projection", projection_class_embeddings_input_dim=a2l_dim)
        self.denoising_unet = _build_unet(unet, "denoiser")
        # SD's attn2 needs a text context; Loopy has no text, so it is a learned constant of
        # several distinct tokens (with one token, or identical ones, attn2's softmax is constant
        # and its to_q/to_k never learn). Unit scale, like CLIP's layer-normed outputs.
        if text_context_tokens < 2:
            raise ValueError("text_context_tokens must be >= 2 (one token makes attn2's queries and keys dead)")
        self.text_context = nn.Parameter(torch.randn(1, text_context_tokens, unet["cross_attention_dim"]))
        if stage == 2:
            for block in _transformers(self.denoising_unet):
                block.add_loopy_layers(audio_context_dim=audio_context_dim, audio_heads=audio_heads,
                                       temporal_heads=temporal_heads, temporal_max_frames=temporal_max_frames)
            self.audio_proj = AudioProjModel(audio_window, audio_layers, audio_dim, audio_proj_hidden,
                                             audio_context_dim, audio_context_tokens)
            self.a2l = AudioToLatents(audio_window * audio_layers * audio_dim, num_keypoints, a2l_dim,
                                      a2l_embeddings, a2l_heads)
            nn.init.zeros_(self.denoising_unet.class_embedding.weight)
            nn.init.zeros_(self.denoising_unet.class_embedding.bias)
        n_ref = install_processors(self.reference_unet, "reference")
        n_den = install_processors(self.denoising_unet, "denoiser")
        if n_ref != n_den or n_ref == 0:
            raise ValueError(f"ReferenceNet has {n_ref} spatial self-attentions, the denoiser {n_den}")

    # ------------------------------------------------------------------ forward
    def forward(self, noisy_latents, timesteps, ref_latents, *, motion_latents=None, motion_mask=None,
                audio=None, keypoints=None, head_motion_var=None, expression_var=None, a2l_condition=None,
                ref_keep=None, audio_keep=None, motion_keep=None) -> torch.Tensor:
        """Predict the diffusion target for every frame.

        noisy_latents [B, F, c, H, W]; timesteps [B]; ref_latents [B, c, H, W].
        Stage 2 only: motion_latents [B, M, c, H, W] + motion_mask [B, M] (False: no history);
        audio [B, F, window, L, D]; A2L inputs (a2l_condition [B] long, default audio;
        keypoints [B, F, K, 3] normalised; variances [B], log1p).
        Condition masks (paper 3.4), [B] bool, True = kept: ref_keep (False removes the
        reference tokens from self-attention and the motion frames from the inter-clip attention),
        audio_keep (False zeroes the audio features and the A2L motion latents), motion_keep
        (False zeroes the motion-frame latents). Returns [B, F, c, H, W].
        """
        ctx = self.reference_context(ref_latents, noisy_latents.shape[1], motion_latents=motion_latents,
                                     motion_mask=motion_mask, motion_keep=motion_keep, ref_keep=ref_keep)
        return self.denoise(noisy_latents, timesteps, ctx, audio=audio, keypoints=keypoints,
                            head_motion_var=head_motion_var, expression_var=expression_var,
                            a2l_condition=a2l_condition, audio_keep=audio_keep)

    def reference_context(self, ref_latents, num_frames: int, *, motion_latents=None, motion_mask=None,
                          motion_keep=None, ref_keep=None, reuse: LoopyContext | None = None) -> LoopyContext:
        """Run the ReferenceNet once: the reference tokens of every ``attn1`` and (stage 2) the
        motion-frame features of every block, for any number of denoising steps.

        The ReferenceNet sees the reference and motion frames at timestep 0, independent of the
        noisy latents, so inference computes this once per clip; with ``reuse`` (the context of an
        earlier clip of the same video) only the motion frames go through it, the reference tokens
        are taken over (once per video).
        """
        b = ref_latents.shape[0]
        ref_keep = (torch.ones(b, dtype=torch.bool, device=ref_latents.device) if ref_keep is None
                    else ref_keep.bool().to(ref_latents.device))
        ctx = LoopyContext(batch_size=b, num_frames=num_frames, ref_keep=ref_keep)
        frames = [] if reuse is not None else [ref_latents]
        if reuse is not None:
            ctx.ref_bank = dict(reuse.ref_bank)
        if self.config.stage == 2:
            motion_latents, motion_mask = self._motion_inputs(motion_latents, motion_mask, ref_latents)
            if motion_keep is not None:
                motion_latents = motion_latents * _per_sample(motion_keep, motion_latents)
            ctx.num_motion = motion_latents.shape[1]
            ctx.motion_keep = motion_mask.bool().to(ref_keep.device) & ref_keep[:, None]
            frames.append(motion_latents.flatten(0, 1))
        if not frames:
            return ctx
        ref_input = torch.cat(frames)
        ctx.ref_rows = 0 if reuse is not None else b
        ctx.capture = True
        try:
            self.reference_unet(ref_input, torch.zeros(ref_input.shape[0], dtype=torch.long, device=ref_input.device),
                                encoder_hidden_states=self.text_context.expand(ref_input.shape[0], -1, -1),
                                cross_attention_kwargs={"loopy": ctx})
        finally:
            ctx.capture = False  # checkpoint recomputation must not overwrite the banks
        return ctx

    def denoise(self, noisy_latents, timesteps, ctx: LoopyContext, *, audio=None, keypoints=None,
                head_motion_var=None, expression_var=None, a2l_condition=None, audio_keep=None) -> torch.Tensor:
        """The denoising U-Net with the reference/motion features of ``ctx``: [B, F, c, H, W]."""
        b, f = noisy_latents.shape[:2]
        if ctx.batch_size != b or ctx.num_frames != f:
            raise ValueError(f"context for {ctx.batch_size} x {ctx.num_frames} frames, latents {b} x {f}")
        class_labels = None
        if self.config.stage == 2:
            if audio is None:
                raise ValueError("a stage-2 LoopyModel needs audio features [B, F, window, L, D]")
            if audio_keep is not None:
                audio = audio * _per_sample(audio_keep.to(audio.device), audio)
            audio = audio.to(noisy_latents.dtype)
            ctx.audio_tokens = self.audio_proj(audio)
            condition = a2l_condition if a2l_condition is not None else torch.zeros_like(timesteps)
            class_labels = self.a2l(condition, audio, keypoints, head_motion_var, expression_var)
            if audio_keep is not None:
                keep = audio_keep.to(class_labels.device, class_labels.dtype).repeat_interleave(f)[:, None]
                class_labels = class_labels * keep
        out = self.denoising_unet(noisy_latents.flatten(0, 1), timesteps.repeat_interleave(f),
                                  encoder_hidden_states=self.text_context.expand(b * f, -1, -1),
                                  class_labels=class_labels, cross_attention_kwargs={"loopy": ctx}).sample
        return out.view(noisy_latents.shape)

    def _motion_inputs(self, motion_latents, motion_mask, like):
        """Zero, fully masked motion frames when none are given (the first clip of a video)."""
        b, c, h, w = like.shape
        if motion_latents is None:
            m = self.config.num_motion_latents
            return like.new_zeros(b, m, c, h, w), torch.zeros(b, m, dtype=torch.bool, device=like.device)
        if motion_mask is None:
            motion_mask = torch.ones(motion_latents.shape[:2], dtype=torch.bool, device=like.device)
        return motion_latents.to(like.dtype), motion_mask

    # ------------------------------------------------------------------ weights
    def load_unet_weights(self, unet_state_dict: dict, which=("reference_unet", "denoising_unet")) -> dict:
        """Load SD 1.5 U-Net weights (diffusers key names) into both U-Nets.

        Every official key must load (no unexpected keys, no SD parameter left missing); the
        only keys the checkpoint may lack are Loopy's own modules. Returns
        {unet: [Loopy-only keys left at their initialisation]}.
        """
        report = {}
        for name in which:
            result = getattr(self, name).load_state_dict(unet_state_dict, strict=False)
            loopy_only = [k for k in result.missing_keys if _is_loopy_key(k)]
            missing = [k for k in result.missing_keys if not _is_loopy_key(k)]
            if result.unexpected_keys or missing:
                raise ValueError(f"U-Net weights do not match {name}: missing {missing[:8]} "
                                 f"({len(missing)}), unexpected {result.unexpected_keys[:8]} "
                                 f"({len(result.unexpected_keys)})")
            report[name] = loopy_only
        return report

    def load_motion_modules(self, adapter_state_dict: dict, layers=("intra_temporal", "inter_temporal")) -> dict:
        """Initialise the temporal layers from AnimateDiff motion modules (diffusers MotionAdapter
        keys; ``loopy_model.weights.motion_adapter_state_dict`` reads either format).

        The adapter's module at ``<block>.motion_modules.<j>`` goes to the denoiser's transformer
        ``<block>.attentions.<j>``; adapter positions with no spatial transformer (SD's
        attention-free ``down_blocks.3`` / ``up_blocks.0``) are skipped and reported. AnimateDiff's
        ``proj_out`` is trained, so after this the model no longer starts from the stage-1 function.
        """
        from loopy_model.weights import motion_modules_by_position

        modules = dict(self.denoising_unet.named_modules())
        loaded, skipped = [], []
        for position, weights in motion_modules_by_position(adapter_state_dict).items():
            block = modules.get(position.replace(".motion_modules.", ".attentions."))
            if not isinstance(block, LoopyTransformer2DModel) or not block.has_loopy_layers:
                skipped.append(position)
                continue
            for layer in layers:
                result = getattr(block, layer).load_state_dict(weights, strict=False)
                if result.unexpected_keys or [k for k in result.missing_keys if k != "type_embedding"]:
                    raise ValueError(f"motion module {position} does not fit {layer}: missing "
                                     f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
            loaded.append(position)
        if not loaded:
            raise ValueError("no motion module position matches this model's spatial transformers")
        return {"loaded": loaded, "skipped": skipped}

    def to_stage2(self, **overrides) -> "LoopyModel":
        """A stage-2 model initialised from this stage-1 model (paper 3.4, "Multistage Training")."""
        if self.config.stage != 1:
            raise ValueError("to_stage2 starts from a stage-1 model")
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        config.update(overrides, stage=2)
        model = LoopyModel(**config)
        result = model.load_state_dict(self.state_dict(), strict=False)
        missing = [k for k in result.missing_keys if not _is_loopy_key(k)]
        if result.unexpected_keys or missing:
            raise ValueError(f"stage-1 weights do not fit: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
        return model


def _build_unet(config: dict, role: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(**config)
    for parent_name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is Transformer2DModel:  # same config, same parameter names
                setattr(parent, child_name, LoopyTransformer2DModel(**child.config))
    for i, block in enumerate(_transformers(unet)):
        block.role, block.block_id = role, i
    return unet


def _transformers(unet) -> list[LoopyTransformer2DModel]:
    return [m for m in unet.modules() if isinstance(m, LoopyTransformer2DModel)]


LOOPY_KEY_PARTS = (".audio_attn.", ".inter_temporal.", ".intra_temporal.", ".class_embedding.", ".audio_proj.", ".a2l.")


def _is_loopy_key(key: str) -> bool:
    return any(part in f".{key}" for part in LOOPY_KEY_PARTS)


def _per_sample(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return keep.to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def parameter_groups(model: LoopyModel) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every parameter in exactly one group (GROUPS).

    ``reference_tail`` is what of the ReferenceNet never reaches the denoiser: its last up block
    and output convolutions (Moore-AnimateAnyone freezes ``up_blocks.3``, ``conv_norm_out``,
    ``conv_out``). Everything there is frozen in both stages, so every trainable parameter
    always receives a gradient.
    """
    last_up = f"reference_unet.up_blocks.{len(model.reference_unet.up_blocks) - 1}."
    groups = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if name.startswith(("audio_proj.",)) or ".audio_attn." in name:
            group = "audio"
        elif name.startswith("a2l.") or name.startswith("denoising_unet.class_embedding."):
            group = "a2l"
        elif ".inter_temporal." in name or ".intra_temporal." in name:
            group = "temporal"
        elif name.startswith(last_up) or name.startswith(("reference_unet.conv_norm_out.", "reference_unet.conv_out.")):
            group = "reference_tail"
        elif name.startswith("reference_unet."):
            group = "reference"
        elif name.startswith("denoising_unet."):
            group = "denoiser"
        elif name == "text_context":
            group = "text_context"
        else:
            raise AssertionError(f"parameter {name} belongs to no group")
        groups[group].append((name, p))
    return groups
