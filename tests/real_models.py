"""Real trained models (and real images) the tests can reach: files shipped inside registry packages.

Random weights cannot show what a trained graph does (its layouts, its opset, its numerics), and
no hub download is possible here, so a test that needs one takes it from a wheel on the package
registry: ``pip download --no-deps`` of a pinned version, the member read straight out of the
zip, its digest checked against the one pinned here. The wheel is never installed (its
dependencies would pull opencv); nothing is imported from it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedFile:
    package: str  # name==version on the registry
    member: str  # path of the file (a model, an image) inside the wheel
    sha256: str

    def fetch(self, folder: Path) -> Path:
        """The model file under ``folder`` (downloaded once per folder), digest checked."""
        out = folder / Path(self.member).name
        if not out.is_file():
            wheels = folder / "wheels"
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
                            self.package], check=True)
            wheel = next(wheels.glob(self.package.split("==")[0].replace("-", "_") + "-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(self.member)
            tmp = out.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(out)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        if digest != self.sha256:
            raise AssertionError(f"{out}: sha256 {digest}, expected {self.sha256} ({self.package} {self.member})")
        return out


# PaddleOCR's PP-OCRv4 models as RapidOCR ships them (Paddle2ONNX exports, opset 12)
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
PPOCR_REC = PackagedFile(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                          "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b")
PPOCR_DET = PackagedFile(RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                          "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9")


def render_words(folder: Path, words: list[str], height: int = 48, offset: int = 0) -> Path:
    """Text lines as a recognizer sees them (dark words on a light strip), one PNG per word,
    in matplotlib's bundled DejaVu fonts (no system font needed)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    folder.mkdir(parents=True, exist_ok=True)
    for i, word in enumerate(words, start=offset):  # offset: a held-out set in other fonts/shades
        font = ImageFont.truetype(str(fonts[i % len(fonts)]), 32)
        box = font.getbbox(word)
        bg, fg = 235 - 7 * (i % 5), 20 + 9 * (i % 4)
        im = Image.new("RGB", (int(box[2]) + 20, height), (bg, bg, bg))
        ImageDraw.Draw(im).text((10, (height - int(box[3])) // 2), word, font=font, fill=(fg, fg, fg))
        im.save(folder / f"w{i:02d}.png")
    return folder


# scikit-image ships real photographs and scans as package data (no download at import)
SKIMAGE = "scikit-image==0.26.0"
PAGE_SCAN = PackagedFile(SKIMAGE, "skimage/data/page.png",
                          "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3")


def render_page(path: Path, seed: int, size: tuple[int, int] = (640, 480)) -> Path:
    """A document page a detector sees: lines of words in DejaVu (serif, sans, mono; bold and
    oblique), 18-40 px, dark inks on a light tinted background; seeded."""
    import matplotlib
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fonts = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("DejaVu*.ttf"))
    vocab = ["total", "invoice", "address", "shipping", "receipt", "phone", "number", "order", "customer",
             "tax", "date", "amount", "due", "paid", "item", "price", "qty", "balance", "account", "ref"]
    bg = tuple(int(v) for v in rng.integers(228, 256, 3))
    im = Image.new("RGB", size, bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(im)
    y = int(rng.integers(8, 24))
    while y < size[1] - 30:
        px = int(rng.integers(18, 41))
        font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), px)
        words = " ".join(str(w) for w in rng.choice(vocab, size=int(rng.integers(2, 5))))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
        draw.text((int(rng.integers(8, 60)), y), words, font=font, fill=ink)  # type: ignore[arg-type]
        y += px + int(rng.integers(10, 40))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path
