"""Bad images: one StageError line naming the file and what was expected, no traceback. Real
(broken) image files: cut short, not an image, a decompression bomb."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.input_faults_common import _refused

EXPECT_RGB = "expected an RGB image (png, jpg, bmp, webp, gif, tiff)"


# --- images --------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "half.png").write_bytes(data[: len(data) // 2])
    (d / "text.png").write_text("not an image")
    return d


def test_broken_images_are_named(images: Path) -> None:
    from stages.lib.qdq.calibset import read_image

    assert read_image(images / "ok.png", (56, 70)).shape == (56, 70, 3)
    assert _refused(read_image, images / "half.png", (56, 56)) == (
        f"{images / 'half.png'} is corrupt: truncated (image file is truncated); {EXPECT_RGB}")
    assert _refused(read_image, images / "text.png", (56, 56)) == (
        f"{images / 'text.png'} is corrupt or not an image (PIL cannot identify its format); {EXPECT_RGB}")


# the image has 5120 pixels: over twice the limit PIL raises its error, over the limit it warns
@pytest.mark.parametrize(("limit", "shown"), [(1000, 2000), (3000, 3000)])
def test_decompression_bomb_is_named(images: Path, limit: int, shown: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from stages.lib.qdq.calibset import folder_samples

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    (images / "p.jsonl").write_text('{"prompt": "x", "image": "ok.png"}\n')
    msg = _refused(lambda: list(folder_samples(images, images / "p.jsonl", 1, [(56, 56)])))
    assert msg == (f"{images / 'ok.png'} is too large to decode safely (Image size (5120 pixels) exceeds limit of "
                   f"{shown} pixels, could be decompression bomb DOS attack.); "
                   f"{EXPECT_RGB}")
