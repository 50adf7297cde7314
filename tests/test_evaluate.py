"""jobs/evaluate.py: scores with the curation job's own scorers, the audio-shift must-show, bad
inputs, --compare, and FID/FVD loading from locally built files of the published layouts.

The sync must-show needs a SyncNet that means something, and the published weights cannot be
downloaded here. As tests/test_syncnet.py does on synthetic clips, a 1/16-width SyncNet (the
real architecture, 64 px input) is trained in the test, self-supervised on the kept clip's own
aligned crops and audio (InfoNCE: the aligned audio window is the positive, the windows a few
frames away are the negatives). It is trained on the clip it then scores: it shows that the
evaluation's crop -> MFCC -> windows -> offset chain reads a known shift of a real talking head
correctly and with the right sign, not that this tiny network generalises.
"""
from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, read_samples, real_path
from model_files import register

JOB = ROOT / "jobs" / "evaluate.py"
SHIFT = 8


def run_job(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def kept_clips(tmp_path_factory, ray_local):
    """The curation job's own kept clips of a real talking head, and the same clips with their
    audio delayed by SHIFT frames (the pipeline's own offset-correction path: shift_audio + remux)."""
    from pipeline.config import load_config
    from pipeline.inputs import expand_inputs
    from pipeline.media import decode_audio, remux_with_audio
    from pipeline.runner import run_curation
    from pipeline.scoring.syncnet import shift_audio

    src = tmp_path_factory.mktemp("eval_src")
    (src / "wda_aoc_000.mp4").symlink_to(real_path("wda_aoc_000.mp4"))
    cur = tmp_path_factory.mktemp("eval_curated")
    run_curation(expand_inputs([str(src)]), cur, load_config(None, **{"features.enabled": False}),
                 progress_every_s=60)
    _, samples = read_samples(cur)
    assert samples, "the curation job kept no clip of wda_aoc_000.mp4"
    orig, shifted = tmp_path_factory.mktemp("kept"), tmp_path_factory.mktemp("kept_shift8")
    for key, members in sorted(samples.items()):
        meta = json.loads(members["meta.json"])
        path = orig / f"{key}.mp4"
        path.write_bytes(members["video.mp4"])
        audio, _ = decode_audio(str(path))
        audio = audio[: meta["clip"]["n_frames"] * 640]
        (shifted / f"{key}.mp4").write_bytes(remux_with_audio(members["video.mp4"], shift_audio(audio, SHIFT)))
    return {"orig": orig, "shifted": shifted, "curated": cur, "keys": sorted(samples)}


@pytest.fixture(scope="module")
def trained_syncnet(kept_clips, tmp_path_factory):
    """A 1/16-width SyncNet (64 px) trained on the kept clips' own crops, saved in the official
    state-dict layout (what --syncnet-weights and the published syncnet_v2.model use).
    800 steps, one thread: ~15 s; seeds 0-3 all gave offset 0 and Sync-C ~10 on the clip."""
    from loopy_model.evaluation import EvalConfig, Scorer
    from pipeline.scoring.syncnet import SyncNet, mfcc

    scorer = Scorer(EvalConfig())  # smoke: its SyncNet input is 64 px, the size trained here
    data = [scorer.sync_inputs(p) for p in sorted(kept_clips["orig"].glob("*.mp4"))]
    vids = [torch.from_numpy(np.ascontiguousarray(v[..., ::-1].transpose(3, 0, 1, 2))) for v, _ in data]  # BGR
    ccs = [torch.from_numpy(mfcc(a)) for _, a in data]
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums on any machine
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = SyncNet(embed_dim=32, width=1 / 16, image_size=64)
            opt = torch.optim.Adam(model.parameters(), lr=2e-3)
            model.train()
            target = torch.arange(32)
            for _ in range(800):
                ims, ccw = [], []
                for _run in range(2):  # two runs of 16 consecutive windows
                    c = rng.integers(len(vids))
                    start = rng.integers(0, vids[c].shape[1] - 5 - 16)
                    ims += [vids[c][:, b:b + 5] for b in range(start, start + 16)]
                    ccw += [ccs[c][None, :, 4 * b:4 * b + 20] for b in range(start, start + 16)]
                logits = -torch.cdist(model.forward_lip(torch.stack(ims).float()),
                                      model.forward_aud(torch.stack(ccw)))
                loss = (torch.nn.functional.cross_entropy(logits, target)
                        + torch.nn.functional.cross_entropy(logits.T, target))
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_tiny.model"
    torch.save(model.eval().state_dict(), path)
    return register(path)  # loaders refuse weights without a recorded sha256


@pytest.fixture(scope="module")
def sync_runs(kept_clips, trained_syncnet, tmp_path_factory):
    """jobs/evaluate.py on the kept clips, then on the shifted clips with --compare to the first."""
    d = tmp_path_factory.mktemp("eval_runs")
    a = run_job(kept_clips["orig"], "--out", d / "orig", "--syncnet-weights", trained_syncnet)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_job(kept_clips["shifted"], "--out", d / "shift8", "--syncnet-weights", trained_syncnet,
                "--compare", d / "orig", "--name", "audio delayed 8 frames")
    assert b.returncode == 0, b.stderr[-3000:]
    return {"orig": d / "orig", "shift8": d / "shift8", "stdout": b.stdout}


def _rows(eval_dir: Path) -> dict[str, dict]:
    return {Path(r["path"]).stem: r for r in pq.read_table(eval_dir / "scores.parquet").to_pylist()}


# ---------------------------------------------------------------------------- the must-show

@pytest.mark.realdata
@pytest.mark.slow
def test_audio_shifted_by_8_frames_moves_the_offset_by_8(kept_clips, sync_runs):
    orig, shifted = _rows(sync_runs["orig"]), _rows(sync_runs["shift8"])
    assert sorted(orig) == sorted(shifted) == kept_clips["keys"]
    for key in kept_clips["keys"]:
        a, b = orig[key], shifted[key]
        assert a["status"] == b["status"] == "ok", (a, b)
        assert a["sync_weights"] == b["sync_weights"] == "syncnet_w0.0625_s64_d32"
        # The curation job's kept clip is in sync; delaying its audio by 8 frames makes the audio
        # lag: syncnet_python's offset (positive = audio leads) moves from 0 to -8.
        assert abs(a["sync_offset"]) <= 1, a
        assert b["sync_offset"] - a["sync_offset"] == -SHIFT, (a["sync_offset"], b["sync_offset"])
        assert a["sync_conf"] >= 3 and b["sync_conf"] >= 3, (a["sync_conf"], b["sync_conf"])  # LatentSync's bar
        # everything but the audio is the same video: the visual scores do not move
        for col in ("yaw_mean", "pitch_mean", "head_translation", "mouth_activity", "expression_var_mean"):
            assert a[col] == pytest.approx(b[col], rel=1e-6, abs=1e-6), col
    # --compare puts both runs side by side: the offset's mean moved by exactly -8
    s = json.loads((sync_runs["shift8"] / "summary.json").read_text())
    c = {r["column"]: r for r in s["compare"]["scores"]}
    assert c["sync_offset"]["mean_delta"] == pytest.approx(-SHIFT)
    assert c["yaw_mean"]["mean_delta"] == pytest.approx(0, abs=1e-6)
    assert s["compare"]["other_path"] == str(sync_runs["orig"])


@pytest.mark.realdata
@pytest.mark.slow
def test_compare_report_shows_both_runs(sync_runs):
    page = (sync_runs["shift8"] / "report.html").read_text()
    md = (sync_runs["shift8"] / "report.md").read_text()
    assert "audio delayed 8 frames" in page and "Compared with orig" in page
    assert "<script" not in page and 'src="http' not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 2  # the plots
    assert f"Compared with `{sync_runs['orig']}`" in md
    for run in ("orig", "shift8"):
        s = json.loads((sync_runs[run] / "summary.json").read_text())
        assert s["fid"]["value"] is None and "fid-weights" in s["fid"]["reason"]  # skipped cleanly
        assert s["fvd"]["value"] is None and "fvd-weights" in s["fvd"]["reason"]
    assert sync_runs["stdout"].strip() == f"report: {sync_runs['shift8'] / 'report.html'}"


@pytest.mark.realdata
@pytest.mark.slow
def test_scores_match_what_the_curation_job_recorded(kept_clips, sync_runs):
    """Same scorers, same 512 frames (after one more H.264 generation): the visual scores the
    evaluation reads off a kept clip are the ones the curation job stored for it."""
    curated = {r["key"]: r for r in pq.read_table(kept_clips["curated"] / "scores.parquet").to_pylist()}
    for key, r in _rows(sync_runs["orig"]).items():
        c = curated[key]
        for col, tol in (("yaw_mean", 1.5), ("pitch_mean", 1.5), ("roll_mean", 1.0), ("yaw_abs_max", 3.0),
                         ("yaw_abs_p95", 2.0)):
            assert abs(r[col] - c[col]) <= tol, (col, r[col], c[col])
        assert r["mouth_activity"] == pytest.approx(c["mouth_activity"], rel=0.15)
        assert r["head_translation"] == pytest.approx(c["head_translation"], abs=0.03)
        assert r["speech_ratio"] == pytest.approx(c["speech_ratio"], abs=0.05)
        assert r["complete_frac"] == 1.0 and r["n_frames"] == int(round(c["duration_s"] * 25))
        assert r["curation_pass"] is True


# ---------------------------------------------------------------------------- bad inputs

def _wav(path: Path, seconds: float = 1.0) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).tobytes())
    return path


def _cover_art_mp3(path: Path) -> Path:
    """An mp3 whose 'video' stream is one still picture (cover art), as podcasts ship them."""
    import av

    with av.open(str(path), "w", format="mp3") as out:
        a = out.add_stream("libmp3lame" if "libmp3lame" in av.codecs_available else "mp3", rate=16000)
        a.layout = "mono"
        v = out.add_stream("mjpeg")
        v.width = v.height = 64
        v.pix_fmt = "yuvj420p"
        pic = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 128, np.uint8), format="rgb24")
        for p in v.encode(pic):
            out.mux(p)
        for p in v.encode(None):
            out.mux(p)
        for i in range(0, 16000, 1152):
            af = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.float32) + 0.01, format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, i
            for p in a.encode(af):
                out.mux(p)
        for p in a.encode(None):
            out.mux(p)
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("this is not a video\n")
    cases = {"zero bytes": (d / "empty.mp4", "empty file"), "not a video": (d / "notes.mp4", "unreadable container"),
             "audio only": (_wav(d / "speech.wav"), "no video stream")}
    try:
        cases["mp3 with cover art"] = (_cover_art_mp3(d / "cover.mp3"), "")
    except Exception:  # noqa: BLE001 - an FFmpeg build without an mp3 muxer: the other cases still run
        pass
    return cases


@pytest.mark.parametrize("case", ["zero bytes", "not a video", "audio only", "mp3 with cover art"])
def test_bad_input_is_one_error_line_and_exit_2(bad_inputs, case, tmp_path):
    if case not in bad_inputs:
        pytest.skip("this FFmpeg build cannot write an mp3 with cover art")
    path, reason = bad_inputs[case]
    r = run_job(path, "--out", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {reason}"), r.stderr
    assert not (tmp_path / "out").exists(), "nothing is written when nothing could be scored"


def test_usage_errors_exit_2(tmp_path):
    r = run_job(tmp_path / "missing.mp4", "--out", tmp_path / "o")
    assert r.returncode == 2 and error_lines(r.stderr) == [f"error: not found: {tmp_path / 'missing.mp4'}"]
    (tmp_path / "empty_dir").mkdir()
    r = run_job(tmp_path / "empty_dir", "--out", tmp_path / "o")
    assert r.returncode == 2 and error_lines(r.stderr)[0].startswith("error: no videos:")
    r = run_job(tmp_path / "empty_dir", "--out", tmp_path / "o", "--fid-weights", tmp_path / "none.pth")
    assert r.returncode == 2 and "--fid-weights" in r.stderr and "Traceback" not in r.stderr
    r = run_job(tmp_path / "empty_dir", "--out", tmp_path / "o", "--profile", "full")
    assert r.returncode == 2 and "--model-dir" in r.stderr
    (tmp_path / "v.mp4").write_bytes(b"\0" * 64)
    r = run_job(tmp_path / "v.mp4", "--out", tmp_path / "o", "--compare", tmp_path / "empty_dir")
    assert r.returncode == 2 and error_lines(r.stderr) == [
        f"error: {tmp_path / 'empty_dir'} is not an evaluation output (scores.parquet and summary.json missing)"]
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def synthetic_video(tmp_path_factory) -> Path:
    """A 2 s synthetic talking head at 30 fps, 360x480 (not square, not 25 fps)."""
    from pipeline.demo import make_talking_head

    p = tmp_path_factory.mktemp("syn") / "talk.mp4"
    make_talking_head(p, duration_s=2.0, fps=30.0, size=360, seed=1)
    return p


def test_bad_inputs_among_good_ones_are_error_rows(bad_inputs, synthetic_video, tmp_path):
    bad = [bad_inputs[c][0] for c in ("zero bytes", "not a video", "audio only")]
    r = run_job(synthetic_video, *bad, "--out", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    errs = error_lines(r.stderr)
    assert len(errs) == 3 and all(any(line.startswith(f"error: {b}:") for line in errs) for b in bad), errs
    rows = pq.read_table(tmp_path / "out" / "scores.parquet").to_pylist()
    assert [r_["status"] for r_ in rows] == ["ok", "error", "error", "error"]
    assert [r_["error"] for r_ in rows[1:]] == ["empty file", "unreadable container", "no video stream"]
    good = rows[0]
    # normalised as the curation job normalises: 25 fps (2 s -> 50 frames), the centred square
    assert good["n_frames"] == 50 and good["src_fps"] == pytest.approx(30, abs=0.1)
    assert good["crop_size"] == 360 and good["face_detected_frac"] > 0.9
    assert good["profile"] == "smoke" and good["sync_weights"] == "smoke-random"
    r = run_job(synthetic_video, bad[0], "--out", tmp_path / "strict", "--quiet", "--strict")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1


# ---------------------------------------------------------------------------- FID / FVD

def _inception_spec() -> dict[str, tuple]:
    """Key -> shape of pytorch-fid's pt_inception-2015-12-05 file, written out from torchvision's
    Inception3 (BasicConv2d = conv without bias + BatchNorm) with fc of 1008 classes."""
    spec: dict[str, tuple] = {}

    def conv(name, cin, cout, kh, kw=None):
        spec[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
        for p in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{name}.bn.{p}"] = (cout,)

    conv("Conv2d_1a_3x3", 3, 32, 3), conv("Conv2d_2a_3x3", 32, 32, 3), conv("Conv2d_2b_3x3", 32, 64, 3)
    conv("Conv2d_3b_1x1", 64, 80, 1), conv("Conv2d_4a_3x3", 80, 192, 3)
    for name, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        conv(f"{name}.branch1x1", cin, 64, 1), conv(f"{name}.branch5x5_1", cin, 48, 1)
        conv(f"{name}.branch5x5_2", 48, 64, 5), conv(f"{name}.branch3x3dbl_1", cin, 64, 1)
        conv(f"{name}.branch3x3dbl_2", 64, 96, 3), conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
        conv(f"{name}.branch_pool", cin, pf, 1)
    conv("Mixed_6a.branch3x3", 288, 384, 3), conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3), conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        conv(f"{name}.branch1x1", 768, 192, 1), conv(f"{name}.branch7x7_1", 768, c7, 1)
        conv(f"{name}.branch7x7_2", c7, c7, 1, 7), conv(f"{name}.branch7x7_3", c7, 192, 7, 1)
        conv(f"{name}.branch7x7dbl_1", 768, c7, 1), conv(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_3", c7, c7, 1, 7), conv(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_5", c7, 192, 1, 7), conv(f"{name}.branch_pool", 768, 192, 1)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1), conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1), conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        conv(f"{name}.branch1x1", cin, 320, 1), conv(f"{name}.branch3x3_1", cin, 384, 1)
        conv(f"{name}.branch3x3_2a", 384, 384, 1, 3), conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{name}.branch3x3dbl_1", cin, 448, 1), conv(f"{name}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{name}.branch_pool", cin, 192, 1)
    spec["fc.weight"], spec["fc.bias"] = (1008, 2048), (1008,)
    return spec


def _random_state_dict(spec: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec.items():
        if k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            sd[k] = torch.ones(shape)
        elif k.endswith(".conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.01
    return sd


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    """A file with pytorch-fid's key names and shapes (random values; 2016-era files have no
    BatchNorm num_batches_tracked, so neither does this one)."""
    p = tmp_path_factory.mktemp("fidw") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(_random_state_dict(_inception_spec()), p)
    register(p)
    return p


class _I3DStub(torch.nn.Module):
    """StyleGAN-V i3d_torchscript.pt's call signature: [B, 3, T, 224, 224] in [-1, 1] -> [B, 400]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=(3, 7, 7), stride=(2, 8, 8))
        self.fc = torch.nn.Linear(8, 400)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        f = self.conv(x).mean(dim=(2, 3, 4))
        return self.fc(f) if return_features else torch.softmax(self.fc(f), dim=1)


@pytest.fixture(scope="module")
def fvd_weights(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fvdw") / "i3d_torchscript.pt"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_I3DStub()), str(p))
    return register(p)


def test_inception_loads_the_published_layouts_strictly(fid_weights, tmp_path):
    from loopy_model.evaluation.frechet import (FID_INCEPTION_ID, TORCHVISION_INCEPTION_ID, FIDInception,
                                                load_inception)

    ours = {k: tuple(v.shape) for k, v in FIDInception().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert ours == _inception_spec() and len(ours) == 94 * 5 + 2
    model, mid = load_inception(fid_weights)
    assert mid == FID_INCEPTION_ID and model.fid
    sd = torch.load(fid_weights, weights_only=True)
    assert torch.equal(model.Mixed_7c.branch3x3dbl_3b.conv.weight, sd["Mixed_7c.branch3x3dbl_3b.conv.weight"])
    with torch.inference_mode():
        assert model(torch.rand(2, 3, 512, 512)).shape == (2, 2048)
    bad = dict(sd)
    bad.pop("Mixed_6e.branch_pool.bn.running_mean")
    torch.save(bad, tmp_path / "bad.pth")
    register(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="Mixed_6e.branch_pool.bn.running_mean"):
        load_inception(tmp_path / "bad.pth")
    # torchvision's ImageNet file: fc 1000 plus AuxLogits; loads into the standard blocks
    tv = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    tv.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
               "AuxLogits.fc.weight": torch.zeros(1000, 768)})
    torch.save(tv, tmp_path / "inception_v3_google-0cc3c7bd.pth")
    model, mid = load_inception(register(tmp_path / "inception_v3_google-0cc3c7bd.pth"))
    assert mid == TORCHVISION_INCEPTION_ID and not model.fid
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    register(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an Inception"):
        load_inception(tmp_path / "other.pth")


def test_frechet_statistics_and_distance():
    from scipy import linalg

    from loopy_model.evaluation.frechet import RunningStats, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.5, 2.0, size=(200, 6))
    st = RunningStats(6, "m")
    for chunk in np.array_split(a, 7):
        st.add(chunk)
    mu, sigma = st.mu_sigma()
    np.testing.assert_allclose(mu, a.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), atol=1e-10)
    mb, sb = b.mean(0), np.cov(b, rowvar=False)
    ref = ((mu - mb) ** 2).sum() + np.trace(sigma + sb - 2 * linalg.sqrtm(sigma @ sb).real)
    assert frechet_distance(mu, sigma, mb, sb) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    # singular covariances (fewer samples than dimensions, as in a small run): still the sqrtm value
    c, d = rng.normal(size=(5, 12)), rng.normal(size=(7, 12))
    s1, s2 = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    ref = ((c.mean(0) - d.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(c.mean(0), s1, d.mean(0), s2) == pytest.approx(ref, rel=1e-6)


def test_fid_fvd_with_local_weights_and_reference(fid_weights, fvd_weights, synthetic_video, tmp_path):
    """FID/FVD statistics are written with the weights; a second run against the first as the
    reference gets a distance (0 for the same video), and a model mismatch is refused."""
    from loopy_model.evaluation import EvalConfig, evaluate
    from loopy_model.evaluation.frechet import load_stats
    from loopy_model.evaluation.run import frechet_vs_reference

    cfg = EvalConfig(fid_weights=str(fid_weights), fvd_weights=str(fvd_weights), fid_stride=5)
    ref = evaluate([str(synthetic_video)], tmp_path / "ref", cfg)
    assert ref["fid"]["value"] is None and "--reference" in ref["fid"]["reason"]
    assert ref["fid"]["n"] == 10 and ref["fvd"]["n"] == 3  # 50 frames: every 5th; 3 whole 16-frame clips
    st = load_stats(tmp_path / "ref" / "fid_stats.npz")
    assert st["mu"].shape == (2048,) and st["sigma"].shape == (2048, 2048) and st["model"] == "pt_inception-2015-12-05"
    assert ref["models"]["fid"] == "pt_inception-2015-12-05" and ref["models"]["fvd"] == "i3d-torchscript:i3d_torchscript.pt"
    cfg.reference = str(tmp_path / "ref")
    same = evaluate([str(synthetic_video)], tmp_path / "same", cfg)
    assert same["fid"]["value"] == pytest.approx(0, abs=1e-3)
    assert same["fvd"]["value"] == pytest.approx(0, abs=1e-3)
    # a pytorch-fid stats file (mu, sigma only) is a reference too
    stats_file = tmp_path / "same" / "fid_stats.npz"
    np.savez(tmp_path / "pfid.npz", mu=st["mu"] + 1.0, sigma=st["sigma"])
    assert frechet_vs_reference(stats_file, tmp_path / "pfid.npz")["value"] == pytest.approx(2048.0, rel=1e-3)
    assert "not an eval dir" in frechet_vs_reference(tmp_path / "same" / "fvd_stats.npz", tmp_path / "pfid.npz",
                                                     "fvd")["reason"]
    # statistics from another network are never compared
    np.savez(tmp_path / "other.npz", mu=st["mu"], sigma=st["sigma"], n=10, model="some-other-inception")
    other = frechet_vs_reference(stats_file, tmp_path / "other.npz")
    assert other["value"] is None and "some-other-inception" in other["reason"]


def test_i3d_loader_refuses_a_state_dict(tmp_path):
    from loopy_model.evaluation.frechet import load_i3d

    torch.save({"Conv3d_1a_7x7.conv3d.weight": torch.zeros(64, 3, 7, 7, 7)}, tmp_path / "rgb_imagenet.pt")
    with pytest.raises(ValueError, match="rgb_imagenet.pt: refused to load .*no sha256 on record"):
        load_i3d(tmp_path / "rgb_imagenet.pt")  # TorchScript holds code: nothing unrecorded is opened
    register(tmp_path / "rgb_imagenet.pt")
    with pytest.raises(ValueError, match="TorchScript"):
        load_i3d(tmp_path / "rgb_imagenet.pt")


# ---------------------------------------------------------------------------- any input: face crop, VFR

@pytest.mark.realdata
@pytest.mark.slow
def test_face_crop_of_raw_vfr_footage(tmp_path):
    """--crop face: the curation job's detect & segment choose the crop of raw (VFR ~30 fps)
    footage, which is then normalised to 25 fps 512x512 and scored."""
    from loopy_model.evaluation import EvalConfig, Scorer
    from pipeline.media import probe

    path = real_path("retalking_face1_vfr30.mp4")
    row = Scorer(EvalConfig(crop="face")).score(path)
    p = probe(str(path))
    assert row["status"] == "ok" and row["crop_mode"] == "face" and row["crop_candidates"] >= 1
    assert row["src_vfr"] and row["n_frames"] % 8 == 0 and row["n_frames"] <= p.duration_s * 25
    assert row["crop_size"] < min(p.width, p.height)  # a face crop, not the whole frame
    # segment.crop_scale = 2: the face box is about half the 512 crop
    assert 180 < row["face_size_out_px"] < 330, row["face_size_out_px"]
    assert row["face_detected_frac"] > 0.95 and row["complete_frac"] > 0.95
