"""Held-out comparison metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_vbp.evaluate import evaluate, spearman


def _classifier(path: Path, weight: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _batches(labels: np.ndarray | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(25, 4)).astype(np.float32)} for _ in range(2)]
    if labels is not None:
        for i, batch in enumerate(batches):
            batch["labels"] = labels[25 * i : 25 * (i + 1)]
    return batches


def test_identical_models_score_perfectly(tmp_path: Path) -> None:
    weight = np.random.default_rng(1).normal(size=(4, 3))
    model = _classifier(tmp_path / "a.onnx", weight)
    result = evaluate(model, model, _batches())
    metrics = result["outputs"]["logits"]
    assert result["samples"] == 50
    assert abs(metrics["cosine"] - 1.0) < 1e-12
    assert metrics["rel_l2"] == 0.0 and metrics["top1_agreement"] == 1.0
    assert abs(metrics["similarity_spearman"] - 1.0) < 1e-12


def test_a_perturbed_model_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(4, 3))
    noisy = weight + rng.normal(scale=0.5, size=weight.shape)
    a, b = _classifier(tmp_path / "a.onnx", weight), _classifier(tmp_path / "b.onnx", noisy)
    batches = _batches()
    x = np.concatenate([batch["x"] for batch in batches])
    truth = (x @ weight).argmax(axis=1)  # the original is right on every sample
    result = evaluate(a, b, _batches(labels=truth))
    expected_after = float(((x @ noisy).argmax(axis=1) == truth).mean())
    assert result["top1_before"] == 1.0
    assert abs(result["top1_after"] - expected_after) < 1e-12 and expected_after < 1.0
    assert result["top1_agreement"] == result["top1_after"]
    metrics = result["outputs"]["logits"]
    assert 0.0 < metrics["cosine"] < 1.0 and metrics["rel_l2"] > 0.1


def test_spearman_is_a_rank_correlation() -> None:
    x = np.random.default_rng(2).normal(size=200)
    assert abs(spearman(x, x**3) - 1.0) < 1e-12  # monotone: ranks agree exactly
    assert abs(spearman(x, -x) + 1.0) < 1e-12
    assert abs(spearman(x, np.random.default_rng(3).normal(size=200))) < 0.2


def test_cached_reference_outputs_give_the_same_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = _classifier(tmp_path / "a.onnx", rng.normal(size=(4, 3)))
    b = _classifier(tmp_path / "b.onnx", rng.normal(size=(4, 3)))
    cache: dict = {}
    first = evaluate(a, b, _batches(), reference=cache)
    assert sorted(cache) == [0, 1]
    (tmp_path / "a.onnx").unlink()  # with the cache, the original model is not run again
    assert evaluate(a, b, _batches(), reference=cache) == first


def test_held_out_data_is_streamed_in_bounded_batches_and_not_capped_by_max_samples(
    tmp_path: Path, monkeypatch
) -> None:
    """A 300-sample file is evaluated 64 samples at a time (memory bounded by the batch, not the
    file), all of it, even with --max-samples capping calibration."""
    from graphs import BlockSpec, build_model, random_batch

    import onnx_vbp.pipeline as pipeline
    from onnx_vbp import PruneOptions, prune_file

    model = build_model([BlockSpec(hidden=16)], seq=4)
    onnx.save(model, tmp_path / "net.onnx")
    np.savez(tmp_path / "calib.npz", **random_batch(model, batch=40))
    np.savez(tmp_path / "held_out.npz", **random_batch(model, batch=300, seed=3))
    sizes: list[int] = []
    real = pipeline.evaluate

    def spy(original, pruned, batches, **kwargs):
        def counted():
            for batch in batches:
                sizes.append(len(batch["x"]))
                yield batch

        return real(original, pruned, counted(), **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    report = prune_file(
        str(tmp_path / "net.onnx"),
        str(tmp_path / "calib.npz"),
        str(tmp_path / "out.onnx"),
        PruneOptions(max_samples=20, progress=False),
        eval_data=str(tmp_path / "held_out.npz"),
    )
    assert sizes == [64, 64, 64, 64, 44] and report.eval["samples"] == 300


def test_an_output_without_a_batch_axis_is_left_out(tmp_path: Path) -> None:
    """An output like an attention map [4, 4] (no row per sample) is not compared, not a crash."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["logits"]),
        helper.make_node("Transpose", ["x"], ["xt"]),
        helper.make_node("MatMul", ["xt", "x"], ["gram"]),
    ]  # [4, batch] @ [batch, 4]
    graph = helper.make_graph(
        nodes,
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("gram", TensorProto.FLOAT, [4, 4]),
        ],
        [numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    result = evaluate(tmp_path / "m.onnx", tmp_path / "m.onnx", _batches())
    assert list(result["outputs"]) == ["logits"] and result["outputs"]["logits"]["cosine"] == 1.0
