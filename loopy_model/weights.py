"""Read pretrained weight files into state dicts keyed by diffusers' own names.

The Loopy model is built from stock diffusers modules (``UNet2DConditionModel`` for the
denoiser and the ReferenceNet, ``AnimateDiffTransformer3D``-named temporal layers; see
``shared/research/04-model-design.md``), so every pretrained source is turned into
diffusers' key names here and the model code only calls ``load_state_dict``.

Sources handled:

* SD 1.5 UNet: a diffusers pipeline directory (``model_index.json`` + ``unet/``), a
  ``unet/`` directory (plain, ``fp16`` variant, sharded, or ``.bin``), or a single-file
  LDM checkpoint (``model.diffusion_model.*`` keys, e.g. ``v1-5-pruned-emaonly.safetensors``)
  converted with diffusers' own ``convert_ldm_unet_checkpoint``.
* AnimateDiff motion modules: a diffusers ``MotionAdapter`` directory or the original
  AnimateDiff checkpoint (``mm_sd_v15_v2.ckpt``), converted with diffusers' own
  ``convert_animatediff_checkpoint_to_diffusers``.

Pickled checkpoints are only ever read with ``torch.load(weights_only=True)``, and every file is
checked against its recorded sha256 first (``pipeline.models.registry.verified_file``: register
downloaded weights once with ``python jobs/fetch_models.py --dir DIR --register PATH``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.models.registry import verified_file, verified_tree

# diffusers.utils.constants: WEIGHTS_NAME / SAFETENSORS_WEIGHTS_NAME and their index files.
_WEIGHTS_STEM = "diffusion_pytorch_model"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Prefix of the UNet inside an LDM / CompVis checkpoint
# (diffusers.loaders.single_file_utils.LDM_UNET_KEY).
LDM_UNET_PREFIX = "model.diffusion_model."

# runwayml/stable-diffusion-v1-5 unet/config.json (diffusers 0.6.0 era), minus the
# "_class_name"/"_diffusers_version" bookkeeping; every other UNet2DConditionModel
# argument takes its default. 859,520,964 parameters, 686 state-dict tensors.
SD15_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
}


# --------------------------------------------------------------------------- files


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """Read one weight file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` via safetensors; ``.bin/.pt/.pth/.ckpt`` via
    ``torch.load(map_location="cpu", weights_only=True)``, so a checkpoint holding any
    pickled object other than tensors and plain containers is refused. A top-level
    ``"state_dict"`` entry (LDM / Lightning / AnimateDiff training checkpoints) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *_PICKLE_SUFFIXES):
        raise ValueError(
            f"{path}: unsupported weight file type {suffix!r}; expected .safetensors or one of {_PICKLE_SUFFIXES}"
        )
    path = verified_file(path, "weight file")  # its recorded sha256, before anything parses it
    if suffix == ".safetensors":
        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file; no pickle import just for its error class
            if type(e).__name__ != "UnpicklingError":  # the weights-only unpickler's refusal
                raise ValueError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from e
            raise ValueError(
                f"{path}: refused to load; it holds pickled objects that torch.load(weights_only=True) "
                f"does not allow. Convert it to .safetensors with a tool you trust. ({e})"
            ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{path}: expected a non-empty dict of tensors, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:5]}")
    return sd


def _diffusers_weight_files(directory: Path) -> list[Path] | None:
    """Weight file(s) of a diffusers model directory, in diffusers' naming, or None.

    Preference: full-precision safetensors (single, then sharded), fp16 variant
    safetensors, then pickled ``.bin``. Sharded checkpoints list their shards in the
    ``weight_map`` of ``*.index[.fp16].json`` (diffusers ``_add_variant`` naming).
    """
    for variant in ("", ".fp16"):
        for ext in ("safetensors", "bin"):
            single = directory / f"{_WEIGHTS_STEM}{variant}.{ext}"
            if single.is_file():
                return [single]
            index = directory / f"{_WEIGHTS_STEM}.{ext}.index{variant}.json"
            if index.is_file():
                weight_map = json.loads(verified_file(index, "weight index file").read_text())["weight_map"]
                return [directory / name for name in sorted(set(weight_map.values()))]
    return None


def _read_diffusers_dir(directory: Path) -> dict[str, torch.Tensor] | None:
    files = _diffusers_weight_files(directory)
    if files is None:
        return None
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(read_state_dict(f))
    return sd


# --------------------------------------------------------------------------- SD 1.5 UNet


def unet_state_dict_from_ldm(checkpoint: dict, config: dict | None = None) -> dict[str, torch.Tensor]:
    """Convert an LDM/CompVis checkpoint's UNet (``model.diffusion_model.*``) to diffusers keys.

    Uses diffusers' own converter
    (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint(checkpoint, config)``,
    the one ``UNet2DConditionModel.from_single_file`` uses); ``config`` is the diffusers
    ``UNet2DConditionModel`` config (default ``SD15_UNET_CONFIG``). Non-EMA weights are
    taken (its default); an ``*-emaonly`` file stores the EMA weights under the plain keys.

    The converter reads only ``layers_per_block`` and the class/addition-embedding fields
    of the config and silently renames whatever it finds, so a checkpoint that does not fit
    the config comes out under wrong names. We therefore compare the result with the
    names and shapes of ``UNet2DConditionModel(**config)`` built on the meta device (no memory).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = {k: v for k, v in (SD15_UNET_CONFIG if config is None else config).items() if not k.startswith("_")}
    if not any(k.startswith(LDM_UNET_PREFIX) for k in checkpoint):
        raise ValueError(f"no '{LDM_UNET_PREFIX}*' keys: not an LDM UNet checkpoint")
    converted = convert_ldm_unet_checkpoint(checkpoint, config)

    with torch.device("meta"):
        expected = UNet2DConditionModel(**config).state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(converted)
                         if converted[k] is None or converted[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            "the LDM checkpoint does not match the UNet config "
            f"(layers_per_block={config.get('layers_per_block')}, "
            f"block_out_channels={config.get('block_out_channels')}): "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong_shape[:3]} "
            f"({len(missing)}/{len(unexpected)}/{len(wrong_shape)})"
        )
    return converted


def _looks_like_diffusers_unet(sd: dict) -> bool:
    return "conv_in.weight" in sd and "time_embedding.linear_1.weight" in sd


def sd15_unet_state_dict(source, *, config: dict | None = None) -> dict[str, torch.Tensor]:
    """UNet weights in ``UNet2DConditionModel`` key names from ``source``.

    ``source``: a diffusers pipeline directory (``model_index.json`` + ``unet/``); a UNet
    directory (``diffusion_pytorch_model[.fp16].safetensors``, sharded safetensors with an
    index json, or ``.bin``); a single file already in diffusers keys; or a single-file LDM
    checkpoint (``model.diffusion_model.*``, ``.safetensors``/``.ckpt``). ``config`` is
    used only to convert an LDM file and defaults to ``SD15_UNET_CONFIG``.
    """
    path = Path(source)
    if path.is_dir():
        unet_dir = path / "unet" if (path / "model_index.json").is_file() else path
        sd = _read_diffusers_dir(unet_dir)
        if sd is None or not _looks_like_diffusers_unet(sd):
            raise ValueError(
                f"{path}: expected a diffusers pipeline directory (model_index.json + unet/) or a UNet "
                f"directory with {_WEIGHTS_STEM}[.fp16].safetensors (or sharded, or .bin) holding "
                f"UNet2DConditionModel weights in {unet_dir}"
            )
        return sd
    if path.is_file():
        sd = read_state_dict(path)
        if any(k.startswith(LDM_UNET_PREFIX) for k in sd):
            try:
                return unet_state_dict_from_ldm(sd, config)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
        if _looks_like_diffusers_unet(sd):
            return sd
        raise ValueError(
            f"{path}: expected an LDM checkpoint with '{LDM_UNET_PREFIX}*' keys or a diffusers UNet "
            f"state dict (conv_in.weight, time_embedding.*); found keys like {list(sd)[:3]}"
        )
    raise ValueError(f"{path}: no such file or directory (expected a diffusers pipeline/UNet directory or a checkpoint)")


# --------------------------------------------------------------------------- AnimateDiff


def _fill_missing_pos_embed(sd: dict[str, torch.Tensor], max_seq_length: int) -> None:
    """Add ``transformer_blocks.N.pos_embed.pe`` where a block has none.

    diffusers' ``SinusoidalPositionalEmbedding`` registers ``pe`` as a *persistent*
    buffer (models/embeddings.py), so it is part of ``AnimateDiffTransformer3D``'s state
    dict, yet diffusers' converter drops AnimateDiff's ``pos_encoder.pe`` and a MotionAdapter
    file may lack it. The values are deterministic (same formula as AnimateDiff's
    ``PositionalEncoding``), so they are recomputed here with diffusers' own module.
    """
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    for key in [k for k in sd if k.endswith(".attn1.to_q.weight")]:
        block = key[: -len(".attn1.to_q.weight")]
        if f"{block}.pos_embed.pe" not in sd:
            dim = sd[key].shape[1]
            pe = SinusoidalPositionalEmbedding(dim, max_seq_length=max_seq_length).pe
            sd[f"{block}.pos_embed.pe"] = pe.to(sd[key].dtype)


def animatediff_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original AnimateDiff motion-module keys -> diffusers ``MotionAdapter`` keys.

    The renaming is diffusers' ``convert_animatediff_checkpoint_to_diffusers``
    (loaders/single_file_utils.py, used by ``MotionAdapter.from_single_file``):
    ``.temporal_transformer`` removed, ``attention_blocks.{0,1}`` -> ``attn{1,2}``,
    ``norms.{0,1}`` -> ``norm{1,2}``, ``ff_norm`` -> ``norm3``. It drops every
    ``pos_encoder.pe``; we keep AnimateDiff's ``attention_blocks.0.pos_encoder.pe`` as the
    block's single ``pos_embed.pe`` (diffusers' ``BasicTransformerBlock`` applies one PE
    before both attentions; AnimateDiff's two copies are identical by construction).
    """
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    converted = convert_animatediff_checkpoint_to_diffusers(checkpoint)
    for k, v in checkpoint.items():
        if not k.endswith(".pos_encoder.pe"):
            continue
        block, attn = re.match(r"^(.*)\.attention_blocks\.(\d+)\.pos_encoder\.pe$", k).groups()
        new_key = block.replace(".temporal_transformer", "") + ".pos_embed.pe"
        if attn == "0":
            converted[new_key] = v
        elif new_key in converted and not torch.equal(converted[new_key], v):
            raise ValueError(f"{k}: differs from attention_blocks.0's PE; diffusers has one PE per block")
    return converted


def motion_adapter_state_dict(source) -> dict[str, torch.Tensor]:
    """AnimateDiff motion-module weights in diffusers ``MotionAdapter`` key names.

    ``source``: a ``MotionAdapter`` directory (``config.json`` + weights) or a single file:
    the original AnimateDiff checkpoint (``mm_sd_v15_v2.ckpt``: ``...motion_modules.J.
    temporal_transformer...``), a full AnimateDiff UNet3D training checkpoint (only its
    ``motion_modules`` keys are kept; a DDP ``module.`` prefix is stripped, AnimateDiff#185),
    or a file already in MotionAdapter keys. Keys look like
    ``down_blocks.I.motion_modules.J.*``, ``mid_block.motion_modules.0.*``, ``up_blocks.I.motion_modules.J.*``.
    """
    path = Path(source)
    max_seq_length = 32  # AnimateDiff v2/v3 and MotionAdapter default
    if path.is_dir():
        sd = _read_diffusers_dir(path)
        if sd is None:
            raise ValueError(
                f"{path}: expected a diffusers MotionAdapter directory with config.json and "
                f"{_WEIGHTS_STEM}[.fp16].safetensors (or sharded, or .bin)"
            )
        config_file = path / "config.json"
        if config_file.is_file():
            max_seq_length = json.loads(config_file.read_text()).get("motion_max_seq_length", max_seq_length)
    elif path.is_file():
        sd = read_state_dict(path)
    else:
        raise ValueError(f"{path}: no such file or directory (expected a MotionAdapter directory or AnimateDiff checkpoint)")

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if ".motion_modules." in k}
    if not sd:
        raise ValueError(f"{path}: no '*.motion_modules.*' keys; not an AnimateDiff motion module / MotionAdapter")
    if any(".temporal_transformer." in k for k in sd):
        sd = animatediff_to_diffusers(sd)
        pes = [v for k, v in sd.items() if k.endswith(".pos_embed.pe")]
        if pes:
            max_seq_length = pes[0].shape[1]
    _fill_missing_pos_embed(sd, max_seq_length)
    return sd


_POSITION = re.compile(r"^((down_blocks|up_blocks)\.(\d+)|mid_block)\.motion_modules\.(\d+)\.(.+)$")


def motion_modules_by_position(adapter_sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group MotionAdapter keys by position.

    ``{"down_blocks.0.motion_modules.0": {"norm.weight": ..., "proj_in.weight": ...,
    "transformer_blocks.0.attn1.to_q.weight": ..., ...}, ...}``; the inner keys are the
    state-dict names of ``diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D``.
    Positions are ordered down blocks, mid block, up blocks (the UNet's forward order).
    """
    groups: dict[tuple, tuple[str, dict]] = {}
    for key, value in adapter_sd.items():
        m = _POSITION.match(key)
        if m is None:
            raise ValueError(f"{key}: not a MotionAdapter key (<block>.motion_modules.<j>.<param>)")
        where, kind, block, j, inner = m.groups()
        order = ({"down_blocks": 0, "up_blocks": 2}.get(kind, 1), int(block or 0), int(j))
        groups.setdefault(order, (f"{where}.motion_modules.{j}", {}))[1][inner] = value
    return {name: inner for _, (name, inner) in sorted(groups.items())}


# --------------------------------------------------------------------------- CLIP text context


def empty_prompt_embedding(sd_dir) -> torch.Tensor | None:
    """[1, 77, 768] CLIP ``last_hidden_state`` of ``""`` from a local SD 1.5 pipeline directory.

    This is SD 1.5's own unconditional context (diffusers ``StableDiffusionPipeline.encode_prompt``
    with ``clip_skip=None``): the tokenizer pads ``""`` to ``tokenizer.model_max_length`` (77)
    with ``padding="max_length", truncation=True`` -> ``[bos, eos, eos, ...]`` and the text
    encoder's output ``[0]`` is taken. Loaded from ``sd_dir/tokenizer`` and
    ``sd_dir/text_encoder`` with the concrete classes ``CLIPTokenizer`` /
    ``CLIPTextModel.from_pretrained(..., local_files_only=True)`` (never the Auto classes, so an
    ``auto_map`` in a config never runs remote code; nothing global is set), in fp32, eval mode,
    under ``no_grad``; an fp16-variant-only text encoder (``model.fp16.safetensors``) is read as
    that variant and upcast. Returns a CPU fp32 tensor, or None when ``sd_dir`` is not a
    directory holding both ``text_encoder/`` and ``tokenizer/`` (a UNet-only dir, a single file).
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(sd_dir)
    tokenizer_dir, encoder_dir = path / "tokenizer", path / "text_encoder"
    if not (path.is_dir() and tokenizer_dir.is_dir() and encoder_dir.is_dir()):
        return None

    verified_tree(encoder_dir, "CLIP text encoder directory")  # recorded sha256s, before transformers reads
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    full_precision = any((encoder_dir / name).is_file() for name in (
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"))
    variant = None if full_precision or not any(encoder_dir.glob("model*.fp16*.safetensors")) else "fp16"
    text_encoder = CLIPTextModel.from_pretrained(
        str(encoder_dir), local_files_only=True, dtype=torch.float32, variant=variant)
    text_encoder.eval()

    # A tokenizer_config without model_max_length reports a huge sentinel; CLIP's position
    # table is the real limit then (77 for SD 1.5).
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    input_ids = tokenizer("", padding="max_length", max_length=max_length, truncation=True,
                          return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(input_ids)[0].float().cpu()
