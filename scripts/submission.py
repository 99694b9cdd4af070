#!/usr/bin/env python
"""Write submission.csv for a SnakeCLEF test set: one class_id per observation, offline.

Usage:
    python scripts/submission.py --metadata test.csv --images-root images/ --model-dir runs/x/model \
        [--aggregate mode|mean] [--decision argmax|min-cost] [--venomous-list venomous.csv]

In a folder written by ``python -m snakeclef.export`` this script sits beside
the model files and a copy of the package code, so ``--model-dir`` defaults to
its own folder and no installed ``snakeclef`` is needed.
"""

import os
import sys
from pathlib import Path

# Set before transformers is imported: the competition sandbox has no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
if (HERE / "snakeclef").is_dir():
    sys.path.insert(0, str(HERE))

from snakeclef.predict import main  # noqa: E402

if __name__ == "__main__":
    main(default_model_dir=HERE if (HERE / "label_map.json").is_file() else None)
