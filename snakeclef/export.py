"""Export a self-contained submission folder: script, package code, classifier, backbone, requirements.

The folder runs with ``python submission.py --metadata CSV --images-root DIR``
on a machine with the listed requirements installed and no network: it holds
its own copy of the package modules the predictor imports, so no
``pip install snakeclef`` is needed there.

Layout::

    submission.py              the submission script
    snakeclef/...              the package modules the predictor imports
    classifier.safetensors     the model folder's files (label_map.json, model.json, metrics.json)
    backbone/                  backbone weights, config.json, preprocessor_config.json
    venomous_status.csv        only when a venomous list was given
    export.json                default aggregate, decision and venomous list for the script
    requirements.txt           pinned versions of the third-party packages the predictor imports
    _SUCCESS
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from snakeclef.predict import AGGREGATES, DECISIONS, EXPORT_SETTINGS, check_choice, read_venomous_flags, resolve_backbone

logger = logging.getLogger(__name__)

MODEL_FILES = ("classifier.safetensors", "label_map.json", "model.json")
OPTIONAL_MODEL_FILES = ("metrics.json",)
BACKBONE_FILES = ("config.json", "preprocessor_config.json")
# The predictor's entry modules; everything they import from the package is copied with them.
PREDICTOR_MODULES = ("snakeclef.predict", "snakeclef.features", "snakeclef.models.classifier", "snakeclef.data.images")
# Imported only when the backbone loads, so listed here to reach requirements.txt.
LAZY_IMPORTS = ("transformers", "tqdm.auto")
# Distributions that the predictor may import, keyed by their top-level module name.
REQUIREMENT_CANDIDATES = {
    "torch": "torch",
    "transformers": "transformers",
    "safetensors": "safetensors",
    "numpy": "numpy",
    "pandas": "pandas",
    "PIL": "pillow",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "lightning": "lightning",
    "pytorch_lightning": "pytorch-lightning",
    "torchmetrics": "torchmetrics",
    "huggingface_hub": "huggingface-hub",
}
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "submission.py"

# Run in a fresh interpreter so that only what the predictor itself imports is listed.
LIST_IMPORTS = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
files = sorted({m.__file__ for n, m in list(sys.modules.items())
                if (n == "snakeclef" or n.startswith("snakeclef.")) and getattr(m, "__file__", None)})
print(json.dumps({"files": files, "modules": sorted({n.split(".")[0] for n in sys.modules})}))
"""


def list_predictor_imports() -> tuple[list[Path], set[str]]:
    """Return the package files and the top-level module names that importing the predictor loads."""
    result = subprocess.run(
        [sys.executable, "-c", LIST_IMPORTS, *PREDICTOR_MODULES, *LAZY_IMPORTS],
        capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if result.returncode != 0:
        raise RuntimeError(f"Importing the predictor modules {PREDICTOR_MODULES} failed:\n{result.stderr[-2000:]}")
    listing = json.loads(result.stdout.strip().splitlines()[-1])
    for forbidden in ("pyspark", "luigi"):
        if forbidden in listing["modules"]:
            raise RuntimeError(f"The predictor imports {forbidden}, which the offline submission must not need.")
    return [Path(path) for path in listing["files"]], set(listing["modules"])


def copy_package(files: list[Path], destination: Path) -> None:
    """Copy package modules under ``destination/snakeclef``, keeping their relative paths."""
    import snakeclef

    package_root = Path(snakeclef.__file__).resolve().parent
    for path in files:
        relative = path.resolve().relative_to(package_root)
        target = destination / "snakeclef" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def write_requirements(modules: set[str], path: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    lines = []
    for module, distribution in REQUIREMENT_CANDIDATES.items():
        if module not in modules:
            continue
        try:
            # Drop a local version label such as "+cpu": it names a build, and pip on another machine picks its own.
            lines.append(f"{distribution}=={version(distribution).split('+')[0]}")
        except PackageNotFoundError:
            lines.append(distribution)
    path.write_text("\n".join(lines) + "\n")


def find_backbone_folder(backbone: str) -> Path:
    """Return the local folder of a backbone given as a folder or as a model name already in the local cache."""
    if Path(backbone).is_dir():
        return Path(backbone)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(backbone, local_files_only=True))
    except Exception as error:  # the hub client raises several types for a name that is not cached
        raise FileNotFoundError(
            f"Backbone {backbone!r} is neither a folder nor a model in the local Hugging Face cache ({error}). "
            "Pass backbone= (--backbone) with a folder that holds config.json and the weights."
        ) from error


def copy_backbone(source: Path, destination: Path) -> None:
    missing = [name for name in BACKBONE_FILES if not (source / name).is_file()]
    weights = sorted(source.glob("*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if missing or not weights:
        raise FileNotFoundError(
            f"Backbone folder {str(source)!r} lacks {missing + ([] if weights else ['*.safetensors weights'])}: "
            "the submission folder needs the weights, config.json and preprocessor_config.json."
        )
    destination.mkdir(parents=True)
    for path in [*(source / name for name in BACKBONE_FILES), *weights, *sorted(source.glob("*.safetensors.index.json"))]:
        shutil.copyfile(path, destination / path.name)


def export_submission(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    backbone: str | os.PathLike | None = None,
    venomous_list: str | os.PathLike | None = None,
    aggregate: str = "mode",
    decision: str = "argmax",
    flip_tta: bool = True,
) -> Path:
    """Write a self-contained submission folder for ``model_dir`` at ``output_dir``; ``_SUCCESS`` is written last.

    ``aggregate``, ``decision`` and ``flip_tta`` become the defaults of the folder's ``submission.py``.
    """
    from snakeclef.models.classifier import load_classifier
    from snakeclef.predict import class_ids_of
    from snakeclef.storage import atomic_path

    check_choice("aggregate", aggregate, AGGREGATES)
    check_choice("decision", decision, DECISIONS)
    if decision == "min-cost" and venomous_list is None:
        raise ValueError("decision='min-cost' needs venomous_list= (--venomous-list) so the folder can carry it.")
    model_dir = Path(model_dir)
    missing = [name for name in MODEL_FILES if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Model folder {str(model_dir)!r} lacks {missing}: pass the model/ folder a training run wrote.")
    if not SCRIPT.is_file():
        # NOTE: the script lives in the source checkout, not in the installed package, so export needs a checkout.
        raise FileNotFoundError(f"Submission script not found at {SCRIPT}: run the export from a source checkout.")

    classifier = load_classifier(model_dir)
    if venomous_list is not None:
        read_venomous_flags(venomous_list, class_ids_of(classifier))  # fail now, not in the sandbox
    backbone_folder = find_backbone_folder(resolve_backbone(model_dir, getattr(classifier, "backbone", None), backbone))
    package_files, modules = list_predictor_imports()

    with atomic_path(output_dir) as tmp:
        tmp.mkdir()
        for name in MODEL_FILES + OPTIONAL_MODEL_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
        copy_backbone(backbone_folder, tmp / "backbone")
        copy_package(package_files, tmp)
        shutil.copyfile(SCRIPT, tmp / "submission.py")
        write_requirements(modules, tmp / "requirements.txt")

        settings = {"aggregate": aggregate, "decision": decision, "flip_tta": flip_tta, "venomous_list": None,
                    "source_model_dir": str(model_dir.resolve()), "source_backbone": str(backbone_folder)}
        if venomous_list is not None:
            shutil.copyfile(venomous_list, tmp / "venomous_status.csv")
            settings["venomous_list"] = "venomous_status.csv"
        (tmp / EXPORT_SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        (tmp / "_SUCCESS").write_text("")

    logger.info("Exported submission folder %s (backbone from %s, %d package files).", output_dir, backbone_folder, len(package_files))
    return Path(output_dir)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Export a self-contained, offline submission folder.")
    parser.add_argument("--model-dir", required=True, help="model folder written by the training stage")
    parser.add_argument("--output", required=True, help="submission folder to write (replaced if it exists)")
    parser.add_argument("--backbone", default=None, help="backbone folder or cached name (default: the one recorded at training)")
    parser.add_argument("--venomous-list", default=None, help="CSV of class_id and MIVS or venomous (0/1), copied into the folder")
    parser.add_argument("--aggregate", choices=AGGREGATES, default="mode", help="default --aggregate of the exported script")
    parser.add_argument("--decision", choices=DECISIONS, default="argmax", help="default --decision of the exported script")
    parser.add_argument("--no-flip-tta", dest="flip_tta", action="store_false", help="the exported script classifies each image once, without its mirror image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return export_submission(
        args.model_dir, args.output, backbone=args.backbone, venomous_list=args.venomous_list,
        aggregate=args.aggregate, decision=args.decision, flip_tta=args.flip_tta,
    )


if __name__ == "__main__":
    main()
