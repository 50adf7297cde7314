"""Media helpers: exact-length AAC clips, audio remux for offset correction, probe facts."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import real_path
from pipeline.media import encode_clip, probe, read_clip, remux_with_audio
from pipeline.scoring.syncnet import shift_audio


def _clicks(n_frames: int, at_frames) -> np.ndarray:
    audio = np.zeros(n_frames * 640, np.float32)
    for f in at_frames:
        audio[f * 640:f * 640 + 64] = 0.9
    return audio


def test_clip_audio_length_is_exact_for_8_frame_multiples():
    frames = np.zeros((96, 64, 64, 3), np.uint8)
    data = encode_clip(frames, _clicks(96, [10]))
    got_frames, audio, info = read_clip(data)
    assert len(got_frames) == 96 and len(audio) == 96 * 640
    assert info["audio_rate"] == 16000 and info["audio_channels"] == 1
    assert abs(int(np.argmax(np.abs(audio))) - 10 * 640) < 64  # the click stays on frame 10


@pytest.mark.parametrize("k", [-6, -2, 3, 6])
def test_offset_correction_remux_shifts_audio_by_k_frames(k):
    frames = np.random.default_rng(0).integers(0, 255, (64, 64, 64, 3), dtype=np.uint8)
    original = encode_clip(frames, _clicks(64, [20, 40]))
    shifted = remux_with_audio(original, shift_audio(_clicks(64, [20, 40]), k))
    f0, a0, _ = read_clip(original)
    f1, a1, _ = read_clip(shifted)
    assert np.array_equal(f0, f1), "video packets are copied, not re-encoded"
    assert len(a1) == len(a0)
    onset0 = np.flatnonzero(np.abs(a0) > 0.45)[0]
    onset1 = np.flatnonzero(np.abs(a1) > 0.45)[0]
    assert abs((onset1 - onset0) - k * 640) < 64


def test_probe_real_facts():
    vfr = probe(str(real_path("retalking_face1_vfr30.mp4")))
    assert vfr.vfr and 21 < vfr.fps < 24 and vfr.video_start_s == pytest.approx(0.033, abs=2e-3)
    hevc = probe(str(real_path("latentsync_demo1_portrait_hevc.mp4")))
    assert (hevc.width, hevc.height, hevc.video_codec, hevc.vfr) == (1080, 1920, "hevc", False)
    noaudio = probe(str(real_path("edtalk_mouth_source_noaudio.mp4")))
    assert noaudio.audio_streams == 0 and noaudio.audio_rate is None


@pytest.mark.parametrize("name", ["latentsync_demo1_portrait_hevc.mp4", "liveportrait_s18_music_static.mp4"])
def test_analysis_frames_are_ffmpeg_scale_and_rgb_conversion(name):
    """iter_frames keeps one swscale context for a whole decode: its frames are, bit for bit, the
    frames PyAV gives when each decoded frame is scaled and converted on its own."""
    import av

    from pipeline.media import iter_frames

    with av.open(str(real_path(name))) as c:
        expected = [f.reformat(width=540 if f.height > f.width else 960, height=960 if f.height > f.width else 540)
                    .to_ndarray(format="rgb24") for f, _ in zip(c.decode(video=0), range(12))]
    got = [img for (_, img), _ in zip(iter_frames(str(real_path(name)), max_side=960), range(12))]
    assert len(got) == 12 and all(np.array_equal(a, b) for a, b in zip(expected, got))


@pytest.mark.parametrize("name", ["latentsync_demo1_portrait_hevc.mp4", "retalking_face1_vfr30.mp4"])
def test_decoder_thread_count_does_not_change_frames(name):
    """The detect stage decodes on as many FFmpeg threads as its actor has CPUs (stages.detect_decode_threads):
    one thread gives the very frames and times of FFmpeg's own thread count (frame threading)."""
    from pipeline.media import iter_frames

    uri = str(real_path(name))
    default = list(iter_frames(uri, max_side=960))
    single = list(iter_frames(uri, max_side=960, threads=1))
    assert len(default) == len(single) > 0
    assert all(ta == tb and np.array_equal(a, b) for (ta, a), (tb, b) in zip(default, single))


@pytest.mark.parametrize("rotation", [90, 270, 180])
def test_display_rotation_is_applied(tmp_path, rotation):
    """Phone video: frames stored turned, with a display matrix saying how to show them upright."""
    import av
    from skimage import data

    from pipeline.media import iter_frames

    upright = np.ascontiguousarray(data.astronaut()[:, :384])  # non-square: width/height must swap
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90 % 4))
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        vs.set_display_rotation(rotation)
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    facts = probe(str(path))
    assert facts.rotation == rotation % 360
    assert (facts.width, facts.height) == (384, 512)
    _, frame = next(iter_frames(str(path), rotation=facts.rotation))
    assert frame.shape == upright.shape
    assert np.abs(frame.astype(int) - upright).mean() < 6  # upright again (codec noise only)


def test_audio_after_a_gap_stays_aligned(tmp_path):
    """A stream with a 1 s hole in its audio (dropped packets): later audio keeps its time."""
    import av
    from fractions import Fraction

    from pipeline.media import decode_audio

    rate = 16000
    path = tmp_path / "gap.mkv"
    with av.open(str(path), "w") as out:
        st = out.add_stream("pcm_s16le", rate=rate)
        st.layout = "mono"
        st.time_base = Fraction(1, rate)
        for start in range(0, 4 * rate, 1024):
            if rate <= start < 2 * rate:
                continue  # the gap: no packets between 1 s and 2 s
            block = np.zeros((1, 1024), np.int16)
            if start <= 3 * rate < start + 1024:
                block[0, 3 * rate - start:] = 20000  # a click at exactly 3.0 s
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    audio, t0 = decode_audio(str(path))
    assert t0 == 0.0
    click = int(np.flatnonzero(np.abs(audio) > 0.3)[0])
    assert abs(click - 3 * rate) <= 32, click / rate
    assert abs(len(audio) - 4 * rate) < 1100


def test_missing_remote_file_is_a_final_media_reject():
    """fsspec raises the builtin FileNotFoundError (not an FFmpeg error): still a clear, final reject."""
    from pipeline.media import MediaError

    with pytest.raises(MediaError) as e:
        probe("memory://bucket/none/such.mp4")
    assert e.value.reason == "file not found" and "such.mp4" in str(e.value)


@pytest.mark.parametrize("source_fps", [15, 30, 60])
def test_frame_rate_conversion_takes_the_nearest_source_frame(tmp_path, source_fps):
    """Output frame j (t = j/25) shows the source frame whose pts is nearest to t, as FFmpeg's
    fps filter with round=near does (definitions audit, item 8); ties go to the earlier frame."""
    import av
    from fractions import Fraction

    from pipeline.crop import crop_and_normalize
    from pipeline.segment import CandidateClip

    path, n_src, size = tmp_path / f"src{source_fps}.mp4", source_fps * 2, 64
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=source_fps)
        st.width, st.height, st.pix_fmt, st.time_base = size, size, "yuv420p", Fraction(1, source_fps)
        st.options = {"crf": "0", "preset": "ultrafast"}  # lossless: the gray level is the frame index
        for i in range(n_src):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 2 * i + 10, np.uint8), format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    n_out = 40  # 1.6 s at 25 fps, inside the 2 s source
    clip = CandidateClip(clip_index=0, track_id=0, shot_index=0, start_s=0.0, n_frames=n_out, crop_x0=0.0,
                         crop_y0=0.0, crop_size=float(size), crop_scale=1.0, face_size_px=32.0, padded=False,
                         max_faces=1)
    seen = []
    results = list(crop_and_normalize(str(path), [clip], rotation=0, audio=np.zeros(16000 * 2, np.float32),
                                      audio_t0=0.0, size=size, on_frame=lambda c, f: seen.append(f)))
    assert len(results) == 1 and len(seen) == n_out
    got = np.array([(int(round(float(f[size // 2, size // 2].mean()))) - 10) / 2 for f in seen])
    t = np.arange(n_out) / 25
    nearest = np.floor(t * source_fps + 0.5 - 1e-9)  # round half down: ties take the earlier frame
    np.testing.assert_allclose(got, nearest, atol=0.5)
    held = np.floor(t * source_fps + 1e-9)  # the old rule (last pts <= t) picks other frames here
    assert (nearest != held).any()


def test_crop_releases_each_clip_encoder_when_its_clip_is_done(tmp_path):
    """A closed ClipEncoder still holds x264's state (~8 MB each, docs/benchmarks.md): a long input's
    dozens of clips must not keep theirs until the input is done."""
    import gc
    from fractions import Fraction

    import av

    from pipeline.crop import crop_and_normalize
    from pipeline.media import ClipEncoder
    from pipeline.segment import CandidateClip

    path, size = tmp_path / "src.mp4", 64
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt, st.time_base = size, size, "yuv420p", Fraction(1, 25)
        st.options = {"preset": "ultrafast"}
        for i in range(100):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i, np.uint8), format="rgb24")
            frame.pts = i
            for p in st.encode(frame):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    clips = [CandidateClip(clip_index=k, track_id=0, shot_index=0, start_s=0.8 * k, n_frames=15, crop_x0=0.0,
                           crop_y0=0.0, crop_size=float(size), crop_scale=1.0, face_size_px=32.0, padded=False,
                           max_faces=1) for k in range(5)]

    def live_encoders() -> int:
        gc.collect()
        return sum(isinstance(o, ClipEncoder) for o in gc.get_objects())

    alive = []
    for cc in crop_and_normalize(str(path), clips, rotation=0, audio=np.zeros(16000 * 5, np.float32), size=size):
        assert len(cc.mp4) > 0
        alive.append(live_encoders())
    assert len(alive) == 5
    assert max(alive) <= 1, alive  # the clips follow each other: one open at a time, none kept after
    assert live_encoders() == 0


def _yuv_frame(width: int, height: int, fmt: str = "yuv420p", seed: int = 0):
    """A decoded-frame stand-in: random planes (every pixel different, so a misplaced region shows)."""
    import av

    frame = av.VideoFrame(width, height, fmt)
    rng = np.random.default_rng(seed)
    for plane in frame.planes:
        plane.update(rng.integers(0, 256, plane.buffer_size, dtype=np.uint8).tobytes())
    frame.colorspace, frame.color_range = 1, 1  # bt709, limited range, as the HEVC real clip
    return frame


@pytest.mark.parametrize("channels", [3, 0])
def test_downscaling_crop_pads_only_its_box_and_equals_padding_the_whole_frame(channels):
    """crop.crop_square pads only the box when it reaches outside the frame (crop.padded_crop): the same
    pixels as padding the whole frame first, on random boxes inside, across the edges of, larger than
    and wholly outside RGB and grey frames."""
    from pipeline.crop import crop_square

    rng = np.random.default_rng(7)
    for trial in range(300):
        h, w = (int(v) for v in rng.integers(20, 240, 2))
        shape = (h, w, channels) if channels else (h, w)
        img = rng.integers(1, 256, shape, dtype=np.uint8)  # no black of its own: a misplaced pad shows
        out = int(rng.choice([8, 16, 33]))
        size = float(rng.uniform(out + 0.01, 1.5 * max(w, h)))  # downscaling: out / size < 1
        x0, y0 = rng.uniform(-size, w), rng.uniform(-size, h)
        if trial % 10 == 0:  # whole pixels
            x0, y0 = float(np.floor(x0)), float(np.floor(y0))
        got = crop_square(img, x0, y0, size, out)
        assert got.shape[:2] == (out, out) and got.flags.c_contiguous
        # the reference: the whole frame zero-padded first (as main ee385b8 did), so that the same box,
        # shifted by the whole-pixel pad, lies inside it and is cut without padding
        pad = int(np.ceil(size)) + max(w, h)
        whole = np.pad(img, ((pad, pad), (pad, pad)) + ((0, 0),) * (img.ndim - 2))
        np.testing.assert_array_equal(got, crop_square(whole, x0 + pad, y0 + pad, size, out))


@pytest.mark.parametrize("width,height,fmt", [(96, 160, "yuv420p"), (160, 96, "yuvj420p"), (97, 61, "yuv420p"),
                                              (96, 64, "yuv444p")])
def test_crop_from_the_converted_region_equals_the_crop_from_the_whole_frame(width, height, fmt):
    """crop.SourceFrame converts only a crop box (plus its resampling margin) of a 4:2:0 frame to RGB:
    every crop (up- and downscaled, reaching outside the frame, at every display rotation) and every
    pixel inside the box must equal what the whole-frame conversion gives (issue 13; odd sizes and
    other formats are converted whole), with and without the decode's kept RGB reformatter."""
    from pipeline.crop import SourceFrame, crop_square
    from pipeline.media import _reformatters, _rotate

    frame = _yuv_frame(width, height, fmt)
    _, to_rgb = _reformatters()
    rng = np.random.default_rng(1)
    for rotation in (0, 90, 180, 270):
        whole = _rotate(frame.to_ndarray(format="rgb24"), rotation)
        np.testing.assert_array_equal(SourceFrame(frame, rotation, to_rgb).whole(), whole)
        h, w = whole.shape[:2]
        for _ in range(40):
            size = rng.uniform(8, 0.8 * min(w, h))
            x0, y0 = rng.uniform(-size / 2, w - size / 2), rng.uniform(-size / 2, h - size / 2)
            img = SourceFrame(frame, rotation).rgb_for(x0, y0, size)
            assert img.shape == whole.shape
            # through the decode's kept reformatter (one thread, one swscale context): the same array
            np.testing.assert_array_equal(SourceFrame(frame, rotation, to_rgb).rgb_for(x0, y0, size), img)
            for out in (16, 48):
                np.testing.assert_array_equal(crop_square(img, x0, y0, size, out), crop_square(whole, x0, y0, size, out))
            a, b = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            np.testing.assert_array_equal(img[b:int(np.ceil(y0 + size)), a:int(np.ceil(x0 + size))],
                                          whole[b:int(np.ceil(y0 + size)), a:int(np.ceil(x0 + size))])
