"""Opening image files safely: inside the image folder, decoded fully, converted to RGB, size-limited."""
from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import PhivlmError

MAX_PIXELS = 64_000_000  # larger images are refused from the header, before decoding (decompression bombs)
MIN_SIDE = 2  # images with a side below this (e.g. 1x1 tracking pixels) are refused
# long side / short side: processors resize the short side up to the tower's size, so a 200000x2 strip (1 KB
# as a PNG) would become a ~19 GiB array; at 50:1 a resize to 518 px stays under 14 Mpx
MAX_ASPECT = 50


class BadImage(PhivlmError):
    pass


def image_path(image_dir: str | Path, name: str) -> Path:
    """Join ``name`` to the image folder, refusing paths that escape it (``..``, absolute paths, symlinks)."""
    try:
        root = Path(image_dir).resolve()
        p = (root / name).resolve()
    except (OSError, ValueError) as e:  # an embedded NUL byte, a name the OS cannot take
        raise BadImage(f"{name!r}: not a usable image path ({e})") from None
    except RuntimeError:  # Python <= 3.12: a symlink loop
        raise BadImage(f"{name}: not a usable image path (symlink loop)") from None
    if root != p and root not in p.parents:
        raise BadImage(f"{name}: image path escapes the image folder {root}")
    return p


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image completely and return it as 8-bit RGB (grayscale, RGBA, CMYK, 16-bit, palette)."""
    p = Path(path)
    try:
        size = p.stat().st_size if p.is_file() else None
    except OSError as e:  # e.g. a file name longer than the OS allows
        raise BadImage(f"{p}: cannot read image file ({e.strerror})") from None
    if size is None:
        raise BadImage(f"{p}: image file not found")
    if size == 0:
        raise BadImage(f"{p}: empty image file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit reports it
            im = Image.open(p)
        with im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(f"{p}: image too large ({im.width}x{im.height} > {MAX_PIXELS} pixels)")
            if min(im.size) < MIN_SIDE:
                raise BadImage(f"{p}: image too small ({im.width}x{im.height}; each side must be >= {MIN_SIDE})")
            if max(im.size) > MAX_ASPECT * min(im.size):
                raise BadImage(f"{p}: image too elongated ({im.width}x{im.height}; the long side may be at most "
                               f"{MAX_ASPECT}x the short one)")
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale -> 8-bit
                im = im.point(lambda v: v / 256).convert("L")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGB", im.size, (255, 255, 255))
                rgba = im.convert("RGBA")
                bg.paste(rgba, mask=rgba.getchannel("A"))
                return bg
            return im.convert("RGB")
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{p}: image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise BadImage(f"{p}: not an image file (unrecognised format)") from None
    except MemoryError:  # a crafted file whose decoder asks for more than there is
        raise BadImage(f"{p}: image needs more memory to decode than is available") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadImage(f"{p}: cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
