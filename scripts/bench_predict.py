#!/usr/bin/env python
"""Benchmark the offline predictor against the fastest bare backbone forward pass on this machine.

The predictor run covers everything per image: reading the file, decoding and
preprocessing, the backbone, [CLS] and DCT features, the classifier and the
per-observation decision. The limit is the backbone alone on pixel tensors
made in advance, at the same device and precision, at the fastest of a few
batch sizes, divided by the passes per image (two with the predictor's
default mirror-image pass, one with ``--no-flip-tta``). Model loading is excluded from both. On a shared machine the load
changes between the two runs, so the script also alternates predictor slices
with bare forward passes on equal image counts (``interleaved_ratio``).

Usage:
    python scripts/bench_predict.py [--images-root DIR] [--backbone DIR] [--batch-size 32] [--no-flip-tta]

The last output line is one JSON object with predict_img_s, limit_img_s and ratio_to_limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from snakeclef.models.backbone import load_backbone  # noqa: E402
from snakeclef.models.classifier import LabelMap, save_model_folder  # noqa: E402
from snakeclef.predict import predict_submission  # noqa: E402

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def measure_forward(backbone, *, batch_size: int, n_images: int) -> float:
    """Return images/s of the backbone alone on a pixel tensor already on the device, in its dtype."""
    pixel_values = torch.randn(batch_size, 3, 224, 224).to(backbone.device, dtype=backbone.dtype)
    n_batches = max(1, n_images // batch_size)
    with torch.inference_mode():
        backbone.model(pixel_values=pixel_values)  # warm-up
        started = time.perf_counter()
        for _ in range(n_batches):
            backbone.model(pixel_values=pixel_values)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return n_batches * batch_size / seconds


def measure_limit(backbone_path: str, *, device: str, precision: str, batch_sizes: list[int], n_images: int) -> dict:
    backbone = load_backbone(backbone_path, device=device, precision=precision)
    rates = {size: measure_forward(backbone, batch_size=size, n_images=n_images) for size in batch_sizes}
    return {"rates": rates, "precision": backbone.precision, "device": str(backbone.device), "hidden_size": backbone.hidden_size}


def measure_interleaved(images_root: Path, image_paths: list[str], model_dir: Path, *, backbone_path: str, batch_size: int,
                        device: str, precision: str, rounds: int, flip_tta: bool) -> dict:
    """Alternate predictor slices and bare forward passes on equal image counts, so both see the same machine load.

    The predictor slice is everything after loading: file reads, decoding,
    backbone, features and classifier (``predict_log_probs``).
    """
    from snakeclef.features import FeatureExtractor
    from snakeclef.models.classifier import load_classifier
    from snakeclef.predict import predict_log_probs

    classifier = load_classifier(model_dir)
    extractor = FeatureExtractor(backbone_path, device=device, precision=precision, batch_size=batch_size)
    backbone = extractor.backbone
    pixel_values = torch.randn(batch_size, 3, 224, 224).to(backbone.device, dtype=backbone.dtype)
    slice_size = len(image_paths) // rounds // batch_size * batch_size
    predict_seconds = forward_seconds = 0.0
    with torch.inference_mode():
        backbone.model(pixel_values=pixel_values)  # warm-up
    for round_index in range(rounds):
        paths = image_paths[round_index * slice_size:(round_index + 1) * slice_size]
        started = time.perf_counter()
        predict_log_probs(paths, images_root, extractor=extractor, classifier=classifier, batch_size=batch_size, flip_tta=flip_tta)
        predict_seconds += time.perf_counter() - started
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(slice_size // batch_size * (2 if flip_tta else 1)):
                backbone.model(pixel_values=pixel_values)
        forward_seconds += time.perf_counter() - started
    images = slice_size * rounds
    return {"predict_img_s": images / predict_seconds, "forward_img_s": images / forward_seconds, "images": images}


def write_random_model(model_dir: Path, *, backbone: str, hidden_size: int, class_ids: list[int]) -> None:
    """Write a model folder with random weights: throughput does not depend on the weights' values."""
    rng = np.random.default_rng(0)
    save_model_folder(
        model_dir,
        weight=rng.normal(0, 0.01, (len(class_ids), hidden_size)).astype(np.float32),
        bias=np.zeros(len(class_ids), np.float32),
        label_map=LabelMap(class_ids),
        info={"feature": "cls", "backbone": backbone, "hidden_size": hidden_size, "dct_k": 8, "class_counts": [1] * len(class_ids)},
        metrics={},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-root", default=str(SHARED / "data" / "ph-snakes"), help="folder with index.csv and the images")
    parser.add_argument("--backbone", default=str(SHARED / "models" / "dinov2-small"), help="backbone folder")
    parser.add_argument("--model-dir", default=None, help="trained model folder (default: random weights over the backbone's [CLS])")
    parser.add_argument("--batch-size", type=int, default=32, help="predictor batch size")
    parser.add_argument("--limit-batch-sizes", default="16,32,64", help="batch sizes tried for the bare forward pass")
    parser.add_argument("--limit-images", type=int, default=256, help="images per batch size for the bare forward pass")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of the interleaved comparison (0 skips it)")
    parser.add_argument("--interleaved-images", type=int, default=512, help="images in the interleaved comparison, over all rounds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--no-flip-tta", dest="flip_tta", action="store_false", help="one backbone pass per image instead of two")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    images_root = Path(args.images_root)
    index = pd.read_csv(images_root / "index.csv")
    batch_sizes = [int(size) for size in args.limit_batch_sizes.split(",")]

    # Limit before and after the predictor; the goal compares with the fastest forward pass measured.
    limit_before = measure_limit(args.backbone, device=args.device, precision=args.precision, batch_sizes=batch_sizes, n_images=args.limit_images)
    print(f"bare forward before ({limit_before['precision']}, {limit_before['device']}): "
          + ", ".join(f"batch {size}: {rate:.1f} img/s" for size, rate in limit_before["rates"].items()))

    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp, "model")
            class_ids = sorted(index["class_id"].unique().tolist()) if "class_id" in index else list(range(10))
            write_random_model(model_dir, backbone=args.backbone, hidden_size=limit_before["hidden_size"], class_ids=class_ids)
        summary = predict_submission(
            images_root / "index.csv", images_root, model_dir, Path(tmp, "submission.csv"),
            batch_size=args.batch_size, device=args.device, precision=args.precision, flip_tta=args.flip_tta, progress=False,
        )
        print(f"predictor: {summary['images']} images, {summary['failures']} failed, {summary['images_per_s']} img/s, "
              f"{summary['seconds']} s including model loading")
        interleaved = None
        if args.rounds > 0:
            interleaved = measure_interleaved(
                images_root, index["image_path"].tolist()[:args.interleaved_images], Path(model_dir), backbone_path=args.backbone,
                batch_size=args.batch_size, device=args.device, precision=args.precision, rounds=args.rounds,
                flip_tta=args.flip_tta,
            )
            print(f"interleaved over {interleaved['images']} images: predictor {interleaved['predict_img_s']:.1f} img/s, "
                  f"bare forward {interleaved['forward_img_s']:.1f} img/s at batch {args.batch_size}")

    limit_after = measure_limit(args.backbone, device=args.device, precision=args.precision, batch_sizes=batch_sizes, n_images=args.limit_images)
    print("bare forward after: " + ", ".join(f"batch {size}: {rate:.1f} img/s" for size, rate in limit_after["rates"].items()))

    passes = 2 if args.flip_tta else 1
    limit = max([*limit_before["rates"].values(), *limit_after["rates"].values()]) / passes
    result = {
        "predict_img_s": round(summary["images_per_s"], 2),
        "limit_img_s": round(limit, 2),
        "ratio_to_limit": round(summary["images_per_s"] / limit, 3),
        "images": summary["images"],
        "interleaved_ratio": round(interleaved["predict_img_s"] / interleaved["forward_img_s"], 3) if interleaved else None,
        "batch_size": args.batch_size,
        "backbone_passes_per_image": passes,
        "precision": limit_before["precision"],
        "device": limit_before["device"],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
