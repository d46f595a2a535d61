"""Pattern matching and rewriting on real third-party exports (fetched by tools/fetch_models.py).

The inputs here are synthetic: this checks graph handling, not retention (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import session_optimized

from onnx_vbp import calibrate, find_mlp_blocks, rewrite, select
from onnx_vbp.cli import main

CACHE = Path(os.environ.get("ONNX_VBP_CACHE", Path.home() / ".cache" / "onnx_vbp"))


def _ids(rng: np.random.Generator) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, 20000, (4, 24)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _images(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input_image": rng.normal(0, 1, (1, 3, 224, 224)).astype(np.float32)}


MODELS = {
    "paraphrase-MiniLM-L3-v2.onnx": (3, _ids),  # BERT encoder, GELU as Div/Erf/Add/Mul/Mul
    "vit_s_focus.onnx": (12, _images),  # ViT-S/16, bias-first Add, Constant nodes
}


@pytest.fixture(params=MODELS, scope="module")
def real(request):
    path = CACHE / request.param
    if not path.exists():
        pytest.skip(f"{path} absent: run python tools/fetch_models.py")
    return onnx.load(path), *MODELS[request.param]


def test_every_mlp_block_is_found(real) -> None:
    model, count, _ = real
    blocks = find_mlp_blocks(model)
    assert len(blocks) == count and blocks.skipped == []
    assert {(b.activation, b.width) for b in blocks} == {("gelu", 1536)}
    assert all("MatMul" in b.fc1 and "MatMul" in b.fc2 for b in blocks)


def test_pruned_model_checks_loads_and_keeps_output_shapes(real) -> None:
    model, _, make_feed = real
    rng = np.random.default_rng(0)
    blocks = find_mlp_blocks(model)
    stats = calibrate(model, blocks, [make_feed(rng) for _ in range(2)])
    plan = select(stats, 0.35)
    pruned = rewrite(model, blocks, stats, plan)
    onnx.checker.check_model(pruned)
    assert [b.width for b in find_mlp_blocks(pruned)] == [plan.keep[b.name].size for b in blocks]
    feed = make_feed(rng)
    before = ort.InferenceSession(model.SerializeToString()).run(None, feed)
    after = ort.InferenceSession(pruned.SerializeToString()).run(None, feed)
    assert [a.shape for a in after] == [b.shape for b in before]
    assert all(np.isfinite(a).all() for a in after if a.dtype.kind == "f")


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PHOTOS = CACHE / "photos"


def _data_dirs(tmp_path: Path) -> tuple[Path, Path]:
    calib, held_out = tmp_path / "calib", tmp_path / "eval"
    calib.mkdir()
    held_out.mkdir()
    return calib, held_out


def _cli_report(tmp_path: Path, argv: list[str]) -> dict:
    assert main([*argv, "-q", "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]) == 0
    return json.loads((tmp_path / "r.json").read_text())


def test_minilm_from_raw_text_through_the_cli(tmp_path: Path) -> None:
    model = CACHE / "paraphrase-MiniLM-L3-v2.onnx"
    if not model.exists() or not SHARED.exists():
        pytest.skip("MiniLM or shared data absent")
    calib, held_out = _data_dirs(tmp_path)
    news = (SHARED / "text" / "lee_background.cor").read_text(encoding="latin-1").splitlines()
    (calib / "news.txt").write_text("\n".join(news[:48]))
    reviews = (SHARED / "text" / "pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines()
    (held_out / "reviews.jsonl").write_text("\n".join(json.dumps({"text": r.split(" ", 1)[1]}) for r in reviews[:40]))
    report = _cli_report(
        tmp_path,
        [
            str(model),
            str(calib),
            "--tokenizer",
            str(SHARED / "minilm-tokenizer" / "tokenizer.json"),
            "--eval",
            str(held_out),
            "--batch-size",
            "16",
        ],
    )
    # the 48 documents run past 128 tokens: read whole, in windows, they make more samples
    assert report["calibration"]["samples"] > 2 * 48 and report["eval"]["samples"] == 40
    assert report["calibration"]["text"]["long_text"] == "split"
    sentence = report["eval"]["outputs"]["461"]  # the mean-pooled sentence embedding
    assert sentence["cosine"] > 0.95 and sentence["similarity_spearman"] > 0.9


@pytest.mark.parametrize("form", ["export", "saved by ORT's session optimizer"])
def test_vit_s_from_photos_through_the_cli(tmp_path: Path, form: str) -> None:
    """The session optimizer saves ViT-S (opset 14) with LayerNormalization in the default domain,
    which ORT defines from opset 1 and ONNX only from 17: onnx.checker alone refuses it."""
    model = CACHE / "vit_s_focus.onnx"
    if not model.exists() or not PHOTOS.exists():
        pytest.skip("ViT-S or photos absent: python tools/fetch_models.py --photos")
    if form != "export":
        model = session_optimized(model, tmp_path / "vit.saved.onnx")
        assert len(find_mlp_blocks(onnx.load(model))) == 12
    calib, held_out = _data_dirs(tmp_path)
    for name in ("hubble_deep_field.jpg", "retina.jpg", "brick.png"):
        (calib / name).write_bytes((PHOTOS / name).read_bytes())
    for name in ("astronaut.png", "rocket.jpg"):
        (held_out / name).write_bytes((PHOTOS / name).read_bytes())
    report = _cli_report(
        tmp_path, [str(model), str(calib), "--ratio", "0.2", "--eval", str(held_out), "--min-samples", "3"]
    )
    saliency = report["eval"]["outputs"]["output_importance"]
    assert report["macs_after"] < report["macs_before"] and saliency["cosine"] > 0.9
