"""Reliability: truncated images, larger-than-inference images, the provenance of result folders
(inference -> seeds -> evaluation), all-or-nothing stages and their error messages."""
import os

import cv2
import numpy as np
import pytest

from icd.data.voc import read_image


def encoded_image(path, **params):
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    flags = [cv2.IMWRITE_JPEG_PROGRESSIVE, 1] if params.get("progressive") else []
    assert cv2.imwrite(str(path), image, flags)
    return path.read_bytes()


@pytest.mark.parametrize("name,progressive", [("a.jpg", False), ("b.jpg", True), ("c.png", False)])
def test_truncated_image_is_an_error_naming_the_file(tmp_path, name, progressive):
    path = tmp_path / name
    encoded = encoded_image(path, progressive=progressive)
    assert read_image(str(path)).shape == (40, 56, 3)
    path.write_bytes(encoded + b"\0" * 16)           # trailing padding is not truncation
    assert read_image(str(path)).shape == (40, 56, 3)
    path.write_bytes(encoded[: len(encoded) * 3 // 4])
    with pytest.raises(ValueError, match=rf"{name}: unreadable image, truncated (JPEG|PNG)"):
        read_image(str(path))
