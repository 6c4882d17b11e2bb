"""Load, validate and convert one image or mask; encode/decode PNG bytes.

Everything here works on a single file and raises `BadInput` (a `DataError` naming the file,
what is wrong and how to fix it). `prepare` decides whether a bad file stops the run
(`prepare.strict: true`) or is skipped and listed in stats.json.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class BadInput(DataError):
    """One input file cannot be used. `path`, `reason` and `fix` are kept for stats.json."""

    def __init__(self, path: Path | str, reason: str, fix: str = "re-export it or remove it"):
        self.path = str(path)
        self.reason = reason
        self.fix = fix
        super().__init__(f"bad input file {path}: {reason}. Fix: {fix} "
                         "(or set prepare.strict: false to skip bad files and list them in stats.json).")


class Notes(Counter):
    """Counts of conversions ("RGBA converted to RGB") plus, for remarks about particular files,
    a few of their paths (`examples`), so stats.json says which files to look at."""

    max_examples = 5

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.examples: dict[str, list[str]] = {}


def remark(notes: Optional[Counter], what: str, path: Path | str) -> None:
    """Count `what` once for the file `path` (and keep the path as an example when `notes` can)."""
    if notes is None:
        return
    notes[what] += 1
    examples = getattr(notes, "examples", None)
    if examples is not None:
        shown = examples.setdefault(what, [])
        if len(shown) < Notes.max_examples:
            shown.append(str(path))


EXIF_ORIENTATION = 0x0112


def _displayed(img: Image.Image, path: Path, notes: Optional[Counter]) -> Image.Image:
    """`img` turned the way viewers and annotation tools show it (EXIF orientation applied).

    Camera and phone JPEGs are often stored sideways with an orientation tag; a mask drawn on
    the displayed image matches the turned image, not the stored pixels.
    """
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:                  # malformed EXIF block: pixels are still usable as stored
        remark(notes, "EXIF data unreadable: used as stored (orientation unknown)", path)
        return img
    if orientation not in range(2, 9):
        return img
    turned = ImageOps.exif_transpose(img)
    remark(notes, "EXIF orientation applied (turned as viewers show it; masks must match the turned image)",
           path)
    return turned


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def open_image(path: Path, notes: Optional[Counter] = None) -> Image.Image:
    """Open and fully decode `path` (so truncated files fail here, not later), EXIF orientation
    applied. A multi-frame file (animated GIF/PNG, multi-page TIFF) gives its first frame, with
    a remark in `notes`: the first page is the full image in TIFF pyramids and thumbnails, and a
    user who wants another frame must export it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BadInput(path, f"cannot be read ({err.strerror})", "check the path and its permissions") from None
    if size == 0:
        raise BadInput(path, "file is empty (0 bytes)")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError:
        raise BadInput(path, "is not an image file Pillow can read (wrong extension or not an image)",
                       "convert it to PNG/JPEG or remove it") from None
    except Image.DecompressionBombError as err:
        raise BadInput(path, f"is too large to decode safely ({err})", "downscale it") from None
    except Exception as err:  # truncated / corrupt data: OSError, SyntaxError, ValueError, zlib.error...
        raise BadInput(path, f"is corrupt or truncated ({type(err).__name__}: {err})") from None
    if img.width <= 0 or img.height <= 0:
        raise BadInput(path, f"has an empty size {img.width}x{img.height}")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        remark(notes, "multi-frame file (animated GIF/PNG or multi-page TIFF): only its first frame used",
               f"{path} ({frames} frames)")
    return _displayed(img, path, notes)


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    a = np.asarray(img)
    if img.mode == "I" and a.size and int(a.max()) <= 255 and int(a.min()) >= 0:
        return Image.fromarray(a.astype(np.uint8))
    a = np.clip(np.rint(a.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _float_to_eight(img: Image.Image) -> Image.Image:
    a = np.asarray(img, dtype=np.float64)
    if a.size and np.nanmax(a) <= 1.0:
        a = a * 255.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8))


def to_base_mode(img: Image.Image, notes: Optional[Counter] = None) -> Image.Image:
    """Any Pillow mode -> "L" or "RGB" (8 bit). Records non-trivial conversions in `notes`."""
    mode = img.mode
    note = None
    if mode in ("L", "RGB"):
        out = img
    elif mode in _SIXTEEN_BIT or mode == "I":
        out = _sixteen_to_eight(img)
        note = f"{mode} (16/32-bit integer) scaled to 8-bit"
    elif mode == "F":
        out = _float_to_eight(img)
        note = "F (float) scaled to 8-bit"
    elif mode == "1":
        out = img.convert("L")
        note = "1 (bilevel) converted to 8-bit grayscale"
    elif mode == "LA" or mode == "La":
        out = img.getchannel(0)
        note = f"{mode} converted to L (alpha dropped)"
    elif mode in ("RGBA", "RGBa", "RGBX"):
        out = img.convert("RGB")
        note = f"{mode} converted to RGB (alpha dropped)" if mode != "RGBX" else None
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        out = img.convert("RGBA" if has_alpha else "RGB").convert("RGB")
        note = f"{mode} (palette) converted to RGB" + (" (alpha dropped)" if has_alpha else "")
    else:  # CMYK, YCbCr, LAB, HSV, ...
        try:
            out = img.convert("RGB")
        except Exception as err:
            raise BadInput(getattr(img, "filename", "?") or "?", f"has unsupported mode {mode} ({err})",
                           "convert it to 8-bit RGB or grayscale") from None
        note = f"{mode} converted to RGB"
    if note and notes is not None:
        notes[note] += 1
    return out


def to_channels(img: Image.Image, channels: int, notes: Optional[Counter] = None) -> Image.Image:
    """Convert to "L" (channels=1) or "RGB" (channels=3)."""
    img = to_base_mode(img, notes)
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        if notes is not None:
            notes[f"{img.mode} converted to {target} (prepare.channels={channels})"] += 1
        img = img.convert(target)
    return img


def mask_strength(img: Image.Image) -> np.ndarray:
    """HxW uint8 "how much defect" of a mask image of any mode (colour masks: brightest channel).

    16-bit masks holding 8-bit values (0/255 in a 16-bit PNG) are taken as they are, not
    scaled to near black. A mask that uses transparency (alpha not constant) is a drawing on a
    transparent layer: its pixels count by colour times alpha (a transparent white background
    is no defect), or by alpha alone when its strokes are black.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(img)
        img = (Image.fromarray(values.astype(np.uint8)) if values.size and 0 <= values.min() and values.max() <= 255
               else _sixteen_to_eight(img))
    elif mode == "F":
        img = _float_to_eight(img)
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[..., 3]
        if alpha.size and alpha.min() < alpha.max():
            drawn = (rgba[..., :3].max(axis=2).astype(np.uint16) * alpha // 255).astype(np.uint8)
            return drawn if drawn.any() else alpha
    if img.mode in ("LA", "La"):
        img = img.getchannel(0)
    if img.mode == "L":
        a = np.asarray(img)
    elif img.mode == "1":
        a = np.asarray(img.convert("L"))
    else:  # colour masks (any non-black colour counts), palette masks via their colours
        a = np.asarray(img.convert("RGB")).max(axis=2)
    return a


def fit_box(width: int, height: int, mode: str) -> tuple[int, int, int, int]:
    """Source box for resizing: the centred square (crop) or the whole image (stretch)."""
    if mode == "stretch":
        return (0, 0, width, height)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return (left, top, left + side, top + side)


def fit(img: Image.Image, resolution: int, mode: str, is_mask: bool = False) -> Image.Image:
    """Resize (and centre-crop) to resolution x resolution; nearest neighbour for masks."""
    box = fit_box(img.width, img.height, mode)
    if img.size == (resolution, resolution) and box == (0, 0, img.width, img.height):
        return img
    resample = Image.NEAREST if is_mask else Image.BICUBIC
    return img.resize((resolution, resolution), resample=resample, box=box)


def image_array(img: Image.Image) -> np.ndarray:
    """HxWxC uint8 array of an "L" or "RGB" image."""
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_image(path: Path, channels: int, resolution: int, resize: str,
               notes: Optional[Counter] = None) -> tuple[np.ndarray, tuple[int, int]]:
    """(HxWxC uint8 array at the target size and mode, (width, height) as displayed)."""
    img = open_image(path, notes)
    size = img.size
    img = to_channels(img, channels, notes)
    if notes is not None and min(size) < resolution:
        notes[f"images smaller than {resolution} px upscaled"] += 1
    return image_array(fit(img, resolution, resize)), size


class LoadedMask(NamedTuple):
    mask: np.ndarray          # HxW uint8 0/1 at the target resolution
    source_pixels: int        # defect pixels (> threshold) at the mask file's own size
    max_value: int            # largest mask value (0: the file is all zero)


def load_mask(path: Path, threshold: int, resolution: int, resize: str,
              expect_size: tuple[int, int], image_path: Path | str,
              notes: Optional[Counter] = None) -> LoadedMask:
    """The mask of an image of displayed size `expect_size`, aligned with it; the counts let a
    caller tell an all-zero file, a 0/1 label mask under the threshold and a defect too small to
    survive the resize apart."""
    img = open_image(path, notes)
    _check_mask_size(img, path, expect_size, image_path)
    strength = mask_strength(img)
    binary = strength > threshold
    fitted = fit(Image.fromarray(binary.astype(np.uint8) * 255), resolution, resize, is_mask=True)
    return LoadedMask((np.asarray(fitted) > 127).astype(np.uint8), int(np.count_nonzero(binary)),
                      int(strength.max()) if strength.size else 0)


def to_uint8_hwc(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[:, :, None]
    return np.ascontiguousarray(a, dtype=np.uint8)


def encode_png(a: np.ndarray) -> bytes:
    """PNG bytes of an HxW / HxWx1 / HxWx3 uint8 array (deterministic)."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_mask_png(mask01: np.ndarray) -> bytes:
    """PNG (uint8 0/255, mode L) of an HxW 0/1 mask."""
    return encode_png((np.asarray(mask01) > 0).astype(np.uint8) * 255)


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> HxW (L) or HxWx3 uint8 array."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()


# --------------------------------------------------------------------------- native scale (patch mode)

def load_image_native(path: Path, channels: int, notes: Optional[Counter] = None) -> np.ndarray:
    """HxWxC uint8 array of `path` at its own size, as displayed, in the target mode."""
    return image_array(to_channels(open_image(path, notes), channels, notes))


def load_binary_mask_native(path: Path, threshold: int, expect_size: tuple[int, int], image_path: Path | str,
                            notes: Optional[Counter] = None) -> tuple[np.ndarray, int]:
    """(HxW uint8 0/1 mask at the image's own size, largest mask value): `load_mask` without the resize."""
    img = open_image(path, notes)
    _check_mask_size(img, path, expect_size, image_path)
    strength = mask_strength(img)
    return (strength > threshold).astype(np.uint8), int(strength.max()) if strength.size else 0


def _check_mask_size(img: Image.Image, path: Path, expect_size: tuple[int, int], image_path: Path | str) -> None:
    if img.size != tuple(expect_size):
        raise BadInput(path, f"mask is {img.width}x{img.height} but its image {image_path} is "
                             f"{expect_size[0]}x{expect_size[1]} (both as displayed, EXIF orientation applied)",
                       "re-export the mask at the image's size, drawn on the image as viewers show it")


def load_index_mask(path: Path, expect_size: tuple[int, int], image_path: Path | str,
                    notes: Optional[Counter] = None) -> np.ndarray:
    """HxW uint8 class-index mask (0 background, k = class k) at the image's own size.

    One value per pixel: modes L, P (the palette index, as VOC-style masks store it), 1, and
    16-bit files holding values up to 255. A colour or transparent mask has no one index per
    pixel and is a bad file."""
    img = open_image(path, notes)
    _check_mask_size(img, path, expect_size, image_path)
    if img.mode in ("L", "P", "1") or img.mode in _SIXTEEN_BIT or img.mode == "I":
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 255):
            raise BadInput(path, f"class-index mask holds values up to {int(values.max())}; indices are 0..255",
                           "save the mask as an 8-bit PNG of class indices")
        return values.astype(np.uint8)
    raise BadInput(path, f"is a {img.mode} image, not a class-index mask (one channel: 0 background, "
                         "1, 2, ... the classes of prepare.segmentation.class_names)",
                   "save the mask as an 8-bit single-channel (L or palette) PNG of class indices")
