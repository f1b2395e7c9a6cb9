"""Image folders and tarballs: scanning, robust decoding with PIL (optionally in parallel), unpacking.

Every image becomes RGB uint8 ``S x S`` (``resize_square``): EXIF orientation applied, first frame of
multi-frame files, any mode (L, LA, P, PA, RGBA, CMYK, YCbCr, I;16, I, F, 1, ...) converted to RGB;
alpha is dropped (pixels keep their colour, as torchvision's ImageFolder loader does); 16-bit
images are scaled to 8 bits (``v // 257``), 32-bit integer/float ones are clipped to 0..255.
Resizing keeps the aspect ratio: the shorter side is scaled to ``S`` (antialiased bilinear) and the
centre ``S x S`` is cropped (``PIL.ImageOps.fit``). Images already ``S x S`` are not resampled.

This module does not touch torch so that decoding workers stay light.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from normlab.errors import NormlabError

try:  # the same list torchvision's ImageFolder accepts
    from torchvision.datasets.folder import IMG_EXTENSIONS
except Exception:  # pragma: no cover
    IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

IMG_EXTENSIONS = tuple(e.lower() for e in IMG_EXTENSIONS)
PARALLEL_MIN_FILES = 2000  # below this, decoding in-process is faster than starting workers
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


# --------------------------------------------------------------------------------------- decoding

def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint32) // 257
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; alpha dropped below
    return img.convert("RGB")


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side -> ``size``, then centre crop to ``size x size`` (aspect ratio kept)."""
    if img.size == (size, size):
        return img
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)


def decode_image(path: str, size: int) -> np.ndarray:
    """Decode one file to an ``size x size x 3`` uint8 array; raises on anything unreadable."""
    if os.path.getsize(path) == 0:
        raise OSError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF/ICC chatter; real problems raise below
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated/corrupt data raises here
            img = ImageOps.exif_transpose(img) or img
            img = resize_square(_to_rgb(img), size)
            arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise OSError(f"decoded to unexpected shape {arr.shape}")
    return arr


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _decode_chunk(paths: list[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    out = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_image(p, size)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per file
            bad.append((i, _reason(exc)))
    return out, bad


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def decode_files(paths: list[str], size: int, workers: int | None = None) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``paths`` to ``N x size x size x 3`` uint8 (zeros where bad) and a list of (index, reason).

    Uses a process pool (one worker per available core, at most 8) for large lists, where decoding
    dominates the pool's start-up (``PARALLEL_MIN_FILES``).
    """
    workers = _workers() if workers is None else workers
    n = len(paths)
    if workers <= 1 or n < PARALLEL_MIN_FILES or "fork" not in mp.get_all_start_methods():
        return _decode_chunk(paths, size)
    per = max(16, min(1024, (48 << 20) // (size * size * 3)))  # keep each result below ~48 MB
    starts = list(range(0, n, per))
    chunks = [paths[s:s + per] for s in starts]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    try:
        # fork: workers inherit the imported modules (no re-import of torch); they only use PIL/numpy
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            for s, (arr, b) in zip(starts, pool.map(_decode_chunk, chunks, repeat(size))):
                out[s:s + len(arr)] = arr
                bad.extend((s + i, r) for i, r in b)
    except (OSError, cf.process.BrokenProcessPool, AssertionError):  # e.g. inside a daemon process
        return _decode_chunk(paths, size)
    return out, bad


# ---------------------------------------------------------------------------------------- scanning

def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``split_dir`` (like torchvision's find_classes)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _unreadable_folder(exc: OSError) -> None:
    raise NormlabError(f"cannot read folder {exc.filename} ({type(exc).__name__}: {exc.strerror}): fix its "
                       "permissions (chmod) or remove it from the data folder") from None


def scan_split(split_dir: Path) -> tuple[dict[str, list[str]], list[str]]:
    """{class: sorted image paths (recursive)} and the list of ignored files (not images / loose files).

    Symlinked folders are followed, but a folder already visited or an ancestor (a symlink loop, or a second
    link to the same folder) is not entered: it is listed with the ignored files instead of duplicating images.
    """
    files: dict[str, list[str]] = {}
    ignored: list[str] = []
    try:
        entries = list(os.scandir(split_dir))
        names = class_dirs(split_dir)
    except OSError as exc:
        _unreadable_folder(exc)
    for e in entries:
        if e.is_file() and not e.name.startswith("."):
            ignored.append(e.path)
    for name in names:
        found: list[str] = []
        top = (split_dir / name).resolve()
        seen = {(st.st_dev, st.st_ino) for st in map(os.stat, top.parents)}  # a link to an ancestor is a loop
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True, onerror=_unreadable_folder):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:  # symlink loop / duplicate link: do not walk it twice
                ignored.append(dirpath)
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                (found if is_image_name(f) else ignored).append(os.path.join(dirpath, f))
        files[name] = found
    return files, sorted(ignored)


def fingerprint_files(root: Path, paths: list[str]) -> str:
    """sha256 over (relative path, size, mtime_ns) of ``paths``: changes when any file is added,
    removed, renamed, resized or touched."""
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            st = os.stat(p)
            ident = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError as exc:  # dangling or looping symlink: decoding skips it with the reason
            ident = f"unreadable:{type(exc).__name__}"
        h.update(f"{os.path.relpath(p, root)}\t{ident}\n".encode())
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """Cheap identity of one big file: name, size and mtime (no hashing of the bytes)."""
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


# ---------------------------------------------------------------------------------------- tarballs

def is_tar_name(path: Path) -> bool:
    return path.name.lower().endswith(TAR_SUFFIXES)


def unpack_tarball(tar_path: Path, cache_dir: Path) -> Path:
    """Unpack ``tar_path`` once into ``cache_dir/unpacked/<name>-<key>`` (key: name+size+mtime).

    Extraction goes to a temporary folder that is renamed into place when complete, so an
    interrupted unpack is never mistaken for a finished one; members are extracted with tarfile's
    ``data`` filter (no absolute paths, no escaping ``..``, no devices).
    """
    key = hashlib.sha256(file_fingerprint(tar_path).encode()).hexdigest()[:16]
    stem = tar_path.name
    for suf in TAR_SUFFIXES:
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    base = cache_dir / "unpacked"
    dest = base / f"{stem}-{key}"
    if (dest / ".complete").is_file():
        return dest
    if not tarfile.is_tarfile(tar_path):
        raise NormlabError(f"data root {tar_path} is not a tar archive: pass a .tar.gz of an image folder, "
                           "or the unpacked folder itself")
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-", dir=base))
    try:
        with tarfile.open(tar_path) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(tmp)
        (tmp / ".complete").write_text(str(tar_path) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first (or a stale incomplete dest): keep theirs
            if (dest / ".complete").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise NormlabError(f"cannot unpack {tar_path} ({_reason(exc)}): the archive is damaged; "
                           "re-copy it or pass the unpacked folder as --data-root") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
