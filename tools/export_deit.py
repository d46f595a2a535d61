"""Export a DeiT-B-size ViT from timm (random weights) to ONNX, for the speed benchmarks of issue 5.

Weights do not change speed, so `pretrained=False` stands in for the paper's DeiT-B: the same
graph (12 blocks, dim 768, MLP 3072, GELU; 86.6 M params, 17.6 GMACs at 224x224) with nothing
to download. Exported with torch's TorchScript exporter, dynamic batch, into the cache folder
of tools/fetch_models.py. Idempotent.

Usage:  python tools/export_deit.py [--model deit_base_patch16_224] [--opset 17]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fetch_models import cache_dir, tolerate_cuda_torchvision


def export(model_name: str, opset: int, cache: Path) -> Path:
    """The cached ONNX file of timm's `model_name` (random weights), exporting it if absent."""
    target = cache / f"{model_name}.random.onnx"
    if target.exists():
        return target
    import torch  # tools-only dependencies

    tolerate_cuda_torchvision()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    partial = target.with_name(target.name + ".part")
    cache.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(partial),
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_base_patch16_224")
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args()
    print(export(args.model, args.opset, cache_dir()))


if __name__ == "__main__":
    main()
