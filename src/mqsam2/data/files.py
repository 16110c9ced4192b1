"""Reading source data sets' files (frames, mask PNGs, numbered folders) with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mqsam2.data.format import DataError, check_jpeg

SINGLE_CHANNEL_MODES = ("1", "L", "P", "I", "I;16")


def read_jpeg(path: Path) -> tuple[bytes, tuple[int, int]]:
    """The file's bytes, unchanged (no re-encoding), and its (height, width)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror}); check the path") from None
    return data, check_jpeg(data, str(path))


def read_mask_png(path: Path) -> np.ndarray:
    """A mask PNG as one channel of integers: palette indices for palette PNGs, grey values otherwise."""
    try:
        with Image.open(path) as image:
            if image.mode not in SINGLE_CHANNEL_MODES:
                raise DataError(f"{path}: mask PNG is {image.mode}; expected a single-channel or palette PNG")
            return np.array(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable mask PNG ({exc}); re-export or remove it") from None


def numbered_files(folder: Path, suffix: str) -> dict[int, Path]:
    """{frame number: path} for files named like 00012<suffix>; anything else with that suffix is an error."""
    found = {}
    for path in folder.glob(f"*{suffix}"):
        if not path.stem.isdigit():
            raise DataError(f"{path}: expected a frame number as the file name (like 00012{suffix})")
        found[int(path.stem)] = path
    return dict(sorted(found.items()))


def check_mask_size(mask: np.ndarray, mask_path: Path, frame_size: tuple[int, int], frame_path: Path) -> None:
    if mask.shape[:2] != tuple(frame_size):
        raise DataError(
            f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but frame {frame_path} is "
            f"{frame_size[0]}x{frame_size[1]}; masks must have their frame's size"
        )


def read_frames(folder: Path) -> tuple[dict[int, Path], list[bytes], tuple[int, int]]:
    """A video's numbered JPEG frames: {frame: path}, their bytes in frame order, and the (height, width)
    that every frame must share."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such frame folder; every annotated video needs its frames")
    paths = numbered_files(folder, ".jpg")
    if not paths:
        raise DataError(f"{folder}: no .jpg frames in the frame folder")
    jpegs, size, first = [], None, None
    for path in paths.values():
        data, frame_size = read_jpeg(path)
        if size is None:
            size, first = frame_size, path
        elif frame_size != size:
            raise DataError(
                f"{path}: frame is {frame_size[0]}x{frame_size[1]} but {first} is {size[0]}x{size[1]}; "
                "all frames of a video must have one size"
            )
        jpegs.append(data)
    return paths, jpegs, size
