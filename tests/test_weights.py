"""loopy_model.weights: pretrained files -> diffusers key names (tiny models, CPU, no downloads).

The LDM and original-AnimateDiff files are built here by inverting diffusers' key mapping,
written independently of the converters under test (after diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py and AnimateDiff's
animatediff/models/motion_module.py names), and anchored to real key names.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from safetensors.torch import load_file, save_file

from model_files import register
from pipeline.models.registry import UntrustedModelFile
from loopy_model.weights import (
    SD15_UNET_CONFIG,
    motion_adapter_state_dict,
    motion_modules_by_position,
    read_state_dict,
    sd15_unet_state_dict,
    unet_state_dict_from_ldm,
)

TINY_UNET = dict(
    sample_size=16,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
TINY_ADAPTER = dict(
    block_out_channels=(8, 16),
    motion_layers_per_block=2,
    motion_num_attention_heads=2,
    motion_norm_num_groups=4,
    motion_max_seq_length=32,
)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET).eval()


@pytest.fixture(scope="module")
def tiny_adapter():
    torch.manual_seed(1)
    adapter = MotionAdapter(**TINY_ADAPTER)
    # proj_out is zero-initialised; give every tensor distinct values so mix-ups show.
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    return adapter


def assert_same(got: dict, want: dict):
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
    for k, v in want.items():
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------- diffusers -> LDM (inverse)

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def ldm_prefixes(config: dict) -> dict[str, str]:
    """diffusers prefix -> LDM prefix for a UNet2DConditionModel config."""
    lpb, nb = config["layers_per_block"], len(config["block_out_channels"])
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(nb):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        if i < nb - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
            has_attn = config["up_block_types"][i].startswith("CrossAttn")
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{2 if has_attn else 1}."
    return m


def to_ldm(sd: dict, config: dict) -> dict:
    prefixes = ldm_prefixes(config)
    out = {}
    for key, v in sd.items():
        hf = next(p for p in prefixes if key.startswith(p))
        rest = key[len(hf):]
        if ".resnets." in hf:
            head, tail = rest.split(".", 1)
            rest = f"{_RESNET_TO_LDM[head]}.{tail}"
        out["model.diffusion_model." + prefixes[hf] + rest] = v
    assert len(out) == len(sd)
    return out


# ----------------------------------------------------------------- SD 1.5 config


def test_sd15_config_builds_the_sd15_unet_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert len(unet.state_dict()) == 686  # tensors of the UNet in v1-5-pruned-emaonly


def test_sd15_ldm_key_set_maps_exactly_onto_diffusers_keys():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    want = unet.state_dict()
    ldm = to_ldm(want, SD15_UNET_CONFIG)
    # Names as they appear in the real v1-5 checkpoint, so the inverse above is anchored.
    for real in ("time_embed.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                 "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
                 "middle_block.1.proj_in.weight",
                 "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                 "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "out.2.weight"):
        assert "model.diffusion_model." + real in ldm, real
    ldm["first_stage_model.encoder.conv_in.weight"] = torch.empty(128, 3, 3, 3, device="meta")
    got = unet_state_dict_from_ldm(ldm)  # default config: SD15_UNET_CONFIG
    assert set(got) == set(want)
    assert all(got[k].shape == want[k].shape for k in want)


# ----------------------------------------------------------------- UNet directories


@pytest.mark.parametrize("save_kwargs", [
    {},
    {"variant": "fp16"},
    {"max_shard_size": "20KB"},
    {"max_shard_size": "20KB", "variant": "fp16"},
    {"safe_serialization": False},
], ids=["safetensors", "fp16", "sharded", "sharded-fp16", "bin"])
def test_unet_directory(tmp_path, tiny_unet, save_kwargs):
    tiny_unet.save_pretrained(tmp_path / "unet", **save_kwargs)
    if "max_shard_size" in save_kwargs:
        assert len(list((tmp_path / "unet").glob("*-of-*"))) > 1
    register(tmp_path)  # loaders refuse weights without a recorded sha256 (tests/model_files.py)
    got = sd15_unet_state_dict(tmp_path / "unet")
    assert_same(got, tiny_unet.state_dict())
    fresh = UNet2DConditionModel(**TINY_UNET)
    fresh.load_state_dict(got, strict=True)


def test_pipeline_directory(tmp_path, tiny_unet):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    tiny_unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "vae").mkdir()
    register(tmp_path)  # loaders refuse weights without a recorded sha256 (tests/model_files.py)
    assert_same(sd15_unet_state_dict(tmp_path), tiny_unet.state_dict())


def test_directory_without_unet_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        sd15_unet_state_dict(tmp_path)


# ----------------------------------------------------------------- LDM single file


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_ldm_single_file_converts_back(tmp_path, tiny_unet, suffix):
    want = tiny_unet.state_dict()
    ldm = to_ldm(want, TINY_UNET)
    # The other parts of an SD checkpoint are ignored.
    ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.ones(4)
    ldm["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
    else:
        torch.save({"state_dict": ldm, "global_step": 7}, path)
    got = sd15_unet_state_dict(register(path), config=TINY_UNET)
    assert_same(got, want)
    fresh = UNet2DConditionModel(**TINY_UNET)
    fresh.load_state_dict(got, strict=True)
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 3, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x, 10, ctx).sample, tiny_unet(x, 10, ctx).sample)


def test_ldm_file_with_wrong_config_is_refused(tmp_path, tiny_unet):
    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm(tiny_unet.state_dict(), TINY_UNET), str(path))
    register(path)
    with pytest.raises(ValueError, match="does not match the UNet config"):
        sd15_unet_state_dict(path)  # SD15_UNET_CONFIG: layers_per_block=2, the file has 1


def test_diffusers_keyed_single_file_passes_through(tmp_path, tiny_unet):
    path = tmp_path / "unet.safetensors"
    save_file(tiny_unet.state_dict(), str(path))
    assert_same(sd15_unet_state_dict(register(path)), tiny_unet.state_dict())


def test_unrelated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2)}, str(path))
    register(path)
    with pytest.raises(ValueError, match="other.safetensors.*model.diffusion_model"):
        sd15_unet_state_dict(path)


# ----------------------------------------------------------------- read_state_dict safety

_SIDE_EFFECT = []


def _record(flag):
    _SIDE_EFFECT.append(flag)
    return flag


class Payload:
    def __reduce__(self):
        return (_record, ("ran",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callback": Payload()}, path)
    with pytest.raises(ValueError, match="evil.ckpt: refused to load this weight file: no sha256 on record"):
        read_state_dict(path)  # unrecorded: refused before torch reads a byte
    register(path)
    with pytest.raises(ValueError, match="evil.ckpt: refused to load; it holds pickled objects"):
        read_state_dict(path)  # recorded: torch.load(weights_only=True) refuses the payload
    assert _SIDE_EFFECT == []  # the payload never ran


def test_read_state_dict_formats_and_errors(tmp_path):
    w = {"a": torch.arange(3.0)}
    torch.save(w, tmp_path / "plain.pt")
    torch.save({"state_dict": w, "epoch": 1}, tmp_path / "wrapped.pth")
    save_file(w, str(tmp_path / "w.safetensors"))
    register(tmp_path)  # loaders refuse weights without a recorded sha256 (tests/model_files.py)
    for name in ("plain.pt", "wrapped.pth", "w.safetensors"):
        assert_same(read_state_dict(tmp_path / name), w)
    torch.save({"model": w, "epoch": 1}, tmp_path / "nested.bin")
    register(tmp_path / "nested.bin")
    with pytest.raises(ValueError, match="nested.bin.*not tensors"):
        read_state_dict(tmp_path / "nested.bin")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="w.npz.*unsupported"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_state_dict(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------- AnimateDiff


def to_animatediff(sd: dict) -> dict:
    """MotionAdapter keys -> original AnimateDiff (VanillaTemporalModule) keys."""
    out = {}
    for key, v in sd.items():
        head, rest = re.match(r"^(.*?\.motion_modules\.\d+)\.(.+)$", key).groups()
        m = re.match(r"^(transformer_blocks\.\d+)\.(attn1|attn2|norm1|norm2|norm3|pos_embed)\.(.+)$", rest)
        if m is None:  # norm / proj_in / proj_out of the temporal transformer
            out[f"{head}.temporal_transformer.{rest}"] = v
            continue
        block, part, tail = m.groups()
        if part == "pos_embed":  # AnimateDiff keeps one PositionalEncoding per attention
            for a in (0, 1):
                out[f"{head}.temporal_transformer.{block}.attention_blocks.{a}.pos_encoder.{tail}"] = v.clone()
            continue
        part = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1",
                "norm1": "norms.0", "norm2": "norms.1", "norm3": "ff_norm"}[part]
        out[f"{head}.temporal_transformer.{block}.{part}.{tail}"] = v
    return out


def test_motion_adapter_directory(tmp_path, tiny_adapter):
    tiny_adapter.save_pretrained(tmp_path / "adapter")
    assert_same(motion_adapter_state_dict(register(tmp_path / "adapter")), tiny_adapter.state_dict())


def test_motion_adapter_directory_without_pe_gets_diffusers_pe(tmp_path, tiny_adapter):
    tiny_adapter.save_pretrained(tmp_path / "adapter")
    f = tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"
    stored = load_file(str(f))
    save_file({k: v for k, v in stored.items() if not k.endswith("pos_embed.pe")}, str(f))
    got = motion_adapter_state_dict(register(tmp_path / "adapter"))
    assert_same(got, tiny_adapter.state_dict())
    assert got["down_blocks.1.motion_modules.0.transformer_blocks.0.pos_embed.pe"].shape == (1, 32, 16)


def test_original_animatediff_checkpoint(tmp_path, tiny_adapter):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    want = tiny_adapter.state_dict()
    original = to_animatediff(want)
    # Real mm_sd_v15_v2 key names, as diffusers' own format detection knows them.
    assert "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe" in original
    assert "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.ff_norm.weight" in original
    assert infer_diffusers_model_type(original) == "animatediff_v2"
    torch.save({"state_dict": original}, tmp_path / "mm_tiny_v2.ckpt")
    assert_same(motion_adapter_state_dict(register(tmp_path / "mm_tiny_v2.ckpt")), want)


def test_animatediff_training_checkpoint_with_ddp_prefix(tmp_path, tiny_adapter, tiny_unet):
    """A whole UNet3D checkpoint saved under DDP (AnimateDiff#185): keep motion modules only."""
    want = tiny_adapter.state_dict()
    full = {f"module.{k}": v for k, v in to_animatediff(want).items()}
    full.update({f"module.{k}": v for k, v in tiny_unet.state_dict().items()})
    torch.save({"state_dict": full, "global_step": 3}, tmp_path / "checkpoint.ckpt")
    assert_same(motion_adapter_state_dict(register(tmp_path / "checkpoint.ckpt")), want)


def test_animatediff_with_mismatched_pe_copies_is_refused(tmp_path, tiny_adapter):
    original = to_animatediff(tiny_adapter.state_dict())
    key = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    original[key] = original[key] + 1
    save_file(original, str(tmp_path / "mm.safetensors"))
    register(tmp_path / "mm.safetensors")
    with pytest.raises(ValueError, match="one PE per block"):
        motion_adapter_state_dict(tmp_path / "mm.safetensors")


def test_non_motion_file_is_a_clear_error(tmp_path, tiny_unet):
    save_file(tiny_unet.state_dict(), str(tmp_path / "unet.safetensors"))
    register(tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="unet.safetensors.*motion_modules"):
        motion_adapter_state_dict(tmp_path / "unet.safetensors")


def test_motion_modules_by_position_loads_strict_into_animatediff_transformer(tiny_adapter):
    groups = motion_modules_by_position(tiny_adapter.state_dict())
    chans = TINY_ADAPTER["block_out_channels"]
    expected = ([f"down_blocks.{i}.motion_modules.{j}" for i in range(2) for j in range(2)]
                + ["mid_block.motion_modules.0"]
                + [f"up_blocks.{i}.motion_modules.{j}" for i in range(2) for j in range(3)])
    assert list(groups) == expected
    for name, inner in groups.items():
        block = name.split(".motion_modules.")[0]
        if block.startswith("down_blocks"):
            c = chans[int(block.split(".")[1])]
        elif block.startswith("up_blocks"):
            c = chans[::-1][int(block.split(".")[1])]
        else:
            c = chans[-1]
        module = AnimateDiffTransformer3D(
            in_channels=c, num_attention_heads=2, attention_head_dim=c // 2, norm_num_groups=4,
            positional_embeddings="sinusoidal", num_positional_embeddings=32)
        module.load_state_dict(inner, strict=True)
        assert_same(module.state_dict(), tiny_adapter.get_submodule(name).state_dict())


def test_motion_modules_by_position_rejects_foreign_keys():
    with pytest.raises(ValueError, match="conv_in.weight"):
        motion_modules_by_position({"conv_in.weight": torch.zeros(1)})


# --------------------------------------------------------------------------- empty-prompt CLIP context

from loopy_model.weights import empty_prompt_embedding  # noqa: E402

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A tiny byte-level BPE vocabulary in CLIP's format: word-final pieces end in "</w>".
TINY_CLIP_VOCAB = {BOS: 0, EOS: 1, "a": 2, "b": 3, "c": 4, "a</w>": 5, "b</w>": 6, "c</w>": 7, "ab": 8, "ab</w>": 9}
TINY_CLIP_MERGES = ["a b", "a b</w>"]
TINY_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      vocab_size=len(TINY_CLIP_VOCAB), max_position_embeddings=77, projection_dim=16,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)


def write_tiny_clip(root, *, seed=0):
    """``root/tokenizer`` laid out like SD 1.5's (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json; no tokenizer.json) and a tiny ``root/text_encoder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "vocab.json").write_text(json.dumps(TINY_CLIP_VOCAB))
    (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_CLIP_MERGES) + "\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    (tok / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}))
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT)).save_pretrained(root / "text_encoder")
    register(root / "text_encoder", root=root)  # loaders refuse weights without a recorded sha256
    return root


def reference_empty_embedding(root):
    """What StableDiffusionPipeline.encode_prompt("") computes (clip_skip=None), done here by hand."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True,
                                                 dtype=torch.float32).eval()
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, text_encoder(ids)[0]


def test_tiny_clip_tokenizer_is_like_sd15s(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip(tmp_path) / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 1)
    # the BPE works: merges apply, word-final pieces carry </w>, lowercase normaliser
    assert tokenizer("AB c").input_ids == [0, 9, 7, 1]
    ids = tokenizer("", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == [0] + [1] * 76  # [bos, eos, eos, ...]: SD 1.5's unconditional prompt


def test_empty_prompt_embedding_matches_encode_prompt(tmp_path):
    root = write_tiny_clip(tmp_path)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    got = empty_prompt_embedding(root)
    ids, want = reference_empty_embedding(root)
    assert ids.tolist() == [[0] + [1] * 76]
    assert got.shape == (1, 77, 16) and got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a different text encoder gives a different context (the weights are really read)
    other = write_tiny_clip(tmp_path / "other", seed=1)
    assert not torch.allclose(empty_prompt_embedding(other), got)


def test_empty_prompt_embedding_none_without_text_encoder_or_tokenizer(tmp_path, tiny_unet):
    unet_only = tmp_path / "unet_only"
    tiny_unet.save_pretrained(unet_only / "unet")
    (unet_only / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert empty_prompt_embedding(unet_only) is None
    assert empty_prompt_embedding(unet_only / "unet") is None

    no_tokenizer = write_tiny_clip(tmp_path / "no_tok")
    for f in (no_tokenizer / "tokenizer").iterdir():
        f.unlink()
    (no_tokenizer / "tokenizer").rmdir()
    assert empty_prompt_embedding(no_tokenizer) is None

    save_file(tiny_unet.state_dict(), str(tmp_path / "unet.safetensors"))
    assert empty_prompt_embedding(tmp_path / "unet.safetensors") is None
    assert empty_prompt_embedding(tmp_path / "missing") is None


def test_empty_prompt_embedding_reads_fp16_variant_as_fp32(tmp_path):
    root = write_tiny_clip(tmp_path)
    _, want = reference_empty_embedding(root)
    enc = root / "text_encoder"
    sd = load_file(str(enc / "model.safetensors"))
    (enc / "model.safetensors").unlink()
    save_file({k: v.half() for k, v in sd.items()}, str(enc / "model.fp16.safetensors"), metadata={"format": "pt"})
    register(enc, root=root)
    got = empty_prompt_embedding(root)
    assert got.dtype == torch.float32 and got.shape == (1, 77, 16)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_empty_prompt_embedding_runs_no_remote_code_and_no_network(tmp_path, monkeypatch):
    """An auto_map in either config names code in the directory; it must never be imported,
    and loading must not open a socket."""
    import socket

    root = write_tiny_clip(tmp_path)
    _, want = reference_empty_embedding(root)
    sentinel = tmp_path / "remote_code_ran"
    for sub, cfg_name, auto_map in (
        ("text_encoder", "config.json", {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}),
        ("tokenizer", "tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    ):
        (root / sub / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
        cfg = json.loads((root / sub / cfg_name).read_text())
        cfg["auto_map"] = auto_map
        (root / sub / cfg_name).write_text(json.dumps(cfg))

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(UntrustedModelFile, match=r"text_encoder/config\.json: refused"):  # changed files first
        empty_prompt_embedding(root)
    register(root / "text_encoder", root=root)  # even when recorded, the auto_map code never runs
    got = empty_prompt_embedding(root)
    assert not sentinel.exists()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
