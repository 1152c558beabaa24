"""Latents -> images: the codec decoder and the PNG writer."""

import torch
from PIL import Image

from pretrain.model.latent_codec import SpaceToDepthCodec
from pretrain.sample.decode import CodecDecoder, save_png


def test_pixel_latents_decode_back_to_the_image(tmp_path):
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    codec = SpaceToDepthCodec(2)
    z = codec.encode(pixels) * 0.5  # as the trainer scales latents by latent_scale
    images = CodecDecoder(codec, latent_scale=0.5)(z)
    torch.testing.assert_close(images, (pixels + 1) / 2, atol=1e-6, rtol=0)
    assert CodecDecoder(codec, 0.5)(z * 10).max() == 1.0  # clipped to [-1, 1] before mapping

    paths = save_png(images, [tmp_path / "x" / "0.png", tmp_path / "x" / "1.png"])
    back = torch.tensor(list(Image.open(paths[1]).getdata()), dtype=torch.float32) / 255
    torch.testing.assert_close(back.T.reshape(3, 8, 8), images[1], atol=1 / 255, rtol=0)


def test_a_write_that_fails_leaves_no_truncated_png(tmp_path, monkeypatch):
    # Before: the PNG was written in place, so a full disk left a cut-short file under the final name.
    import errno
    import os

    import pytest

    path = tmp_path / "step_0000002.png"
    path.write_bytes(b"an earlier picture")
    real_save = Image.Image.save

    def disk_full_halfway(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full_halfway)
    with pytest.raises(OSError):
        save_png(torch.zeros(1, 3, 4, 4), [path])
    assert path.read_bytes() == b"an earlier picture" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
