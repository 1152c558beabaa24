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
