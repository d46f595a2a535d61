"""Train the embedded demo model: a small DeiT-like ViT on Fashion-MNIST, exported to ONNX.

Writes, under --out (default ``models/``):
  demo_vit.onnx                         the model (input ``image`` [B,1,28,28] in [0,1], output ``logits``)
  calib/train_XX.npz                    calibration batches from the *train* split
  eval/test_subset.npz                  held-out batch from the *test* split, with ``labels``
  demo_vit.json                         training facts (epochs, full 10k test top-1, ...)

PyTorch is a tools-only dependency:  pip install torch==2.13.0
Usage:  python tools/train_demo_vit.py --epochs 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from fashion_mnist import DATA, load_split
from torch import nn

MEAN, STD = 0.2860, 0.3530


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(
        self, dim: int = 128, depth: int = 6, heads: int = 4, mlp_ratio: int = 4, patch: int = 4, classes: int = 10
    ) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed((image - MEAN) / STD).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def augment(batch: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(batch.shape[0]) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    padded = nn.functional.pad(batch, (2, 2, 2, 2))
    dx, dy = np.random.randint(0, 5, size=2)
    return padded[:, :, dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 500):
        logits = model(torch.from_numpy(images[i : i + 500]))
        correct += int((logits.argmax(1).numpy() == labels[i : i + 500]).sum())
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    train_x, train_y = load_split("train", args.data)
    test_x, test_y = load_split("test", args.data)

    model = TinyViT()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(train_x) // args.batch_size
    total = max(1, steps_per_epoch * args.epochs)
    warmup = steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = np.random.permutation(len(train_x))
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            x = augment(torch.from_numpy(train_x[idx]))
            loss = loss_fn(model(x), torch.from_numpy(train_y[idx]))
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        top1 = accuracy(model, test_x, test_y)
        print(
            f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  test top-1 {top1:.4f}  "
            f"{time.time() - start:.0f}s",
            flush=True,
        )

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    onnx_path = args.out / "demo_vit.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(test_x[:2]),),
        str(onnx_path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )

    rng = np.random.default_rng(args.seed)
    calib_idx = rng.choice(len(train_x), args.calib_samples, replace=False)
    calib_dir = args.out / "calib"
    calib_dir.mkdir(exist_ok=True)
    for i, chunk in enumerate(np.array_split(calib_idx, max(1, args.calib_samples // 128))):
        np.savez_compressed(calib_dir / f"train_{i:02d}.npz", image=train_x[np.sort(chunk)])
    eval_idx = np.sort(rng.choice(len(test_x), args.eval_samples, replace=False))
    eval_dir = args.out / "eval"
    eval_dir.mkdir(exist_ok=True)
    np.savez_compressed(eval_dir / "test_subset.npz", image=test_x[eval_idx], labels=test_y[eval_idx])

    facts = {
        "epochs": args.epochs,
        "test_top1_full_10k": accuracy(model, test_x, test_y),
        "test_top1_eval_subset": accuracy(model, test_x[eval_idx], test_y[eval_idx]),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(time.time() - start),
        "torch": torch.__version__,
    }
    (args.out / "demo_vit.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()
