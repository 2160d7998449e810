"""Images in and out: PSNR, PNGs that carry their generation parameters, and init images for img2img.

A PNG written by `sdrt generate` holds one text chunk, key `sdrt`, whose value is JSON with everything needed to
make the same image again (prompt, negative prompt, seed, steps, scheduler, guidance, size, model name and hash,
backend, strength). `read_params(path)` returns it.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from sdrt.errors import SdrtError

PNG_KEY = "sdrt"


def psnr(a, b, peak: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB between two images of the same shape; inf when identical.

    uint8 images are compared on [0, 255], float images on [0, 1] (peak overrides). 40 dB is a max error of a few
    levels in 255; 50 dB is below one level on average.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    if peak is None:
        peak = 255.0 if a.dtype == np.uint8 and b.dtype == np.uint8 else 1.0
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def save_png(image, path, params: dict | None = None) -> Path:
    """Write one image ((H, W, 3) uint8 array or PIL image) as PNG, with `params` as JSON in the `sdrt` text chunk."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PNG_KEY, json.dumps(params, sort_keys=True))
    from sdrt.export.engine_cache import atomic_write

    # Encoded in memory, then written whole (temp + rename): a full disk or Ctrl-C never leaves a truncated PNG, nor
    # destroys the file that was there. A symlink is written through, not replaced.
    buf, target = io.BytesIO(), Path(os.path.realpath(path))
    try:
        im.save(buf, format="PNG", pnginfo=info)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, buf.getbuffer())
    except OSError as e:
        raise SdrtError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read_params(path) -> dict | None:
    """The generation parameters stored by save_png, or None if the PNG has none."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.text.get(PNG_KEY) if hasattr(im, "text") else None
    return json.loads(text) if text else None


def params_from(path) -> dict:
    """read_params for the CLI: a missing file, a file that is not a PNG, or a PNG without sdrt's chunk is a
    one-line SdrtError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # an error, not two lines of warning
            params = read_params(Path(path).expanduser())
    except FileNotFoundError:
        raise SdrtError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, RecursionError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:  # RecursionError: a crafted chunk of deeply nested JSON
        raise SdrtError(f"{path}: cannot read generation parameters ({type(e).__name__})") from None
    if not isinstance(params, dict):
        raise SdrtError(f"{path}: holds no sdrt generation parameters (only PNGs written by `sdrt generate` do)")
    return params


def load_image(path):
    """An init image as an RGB PIL image; a file that is missing or not an image is a one-line SdrtError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns (two lines on stderr) past 89M pixels and raises past twice that: both far past 4096^2
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(Path(path).expanduser())
        with opened:
            im = ImageOps.exif_transpose(opened)  # a phone photo's EXIF orientation, as diffusers' load_image does
            if im.mode.startswith("I;16") or im.mode == "I":  # 16/32-bit grey: convert("RGB") would clip at 255
                a = np.asarray(im, dtype=np.float64)
                scale = 257 if im.mode.startswith("I;16") or a.max() > 255 else 1  # "I" holding 8-bit levels: as is
                im = Image.fromarray((a / scale).round().clip(0, 255).astype(np.uint8))
            return im.convert("RGB")
    except FileNotFoundError:
        raise SdrtError(f"init image {path}: no such file") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise SdrtError(f"init image {path}: too many pixels to open (sdrt takes up to 4096 per side)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SdrtError(f"init image {path}: cannot open as an image ({type(e).__name__})") from None


def output_paths(out, n: int) -> list[Path]:
    """OUT.png for the first image, OUT-1.png, OUT-2.png, ... for the others."""
    if not str(out):
        raise SdrtError("the output path is empty")
    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise SdrtError(f"output {out}: sdrt writes PNG files, name it *.png")
    paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, n)]
    for p in paths:  # every one before any work: a batch must not fail at its second file
        if p.is_dir():
            raise SdrtError(f"output {p} is a directory")
    # Checked before the generation, not after it: the nearest existing ancestor (save_png makes the rest) of where
    # the file lands (a symlink's target) must be a directory a file can be made in; a real file, since os.access
    # says yes to root everywhere, /proc included.
    up = Path(os.path.realpath(out)).parent
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise SdrtError(f"output {out}: {up} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=up):
            pass
    except OSError as e:
        raise SdrtError(f"output {out}: cannot write in {up} ({e.strerror or e})") from None
    return paths
