"""Luigi tasks that chain the stages; the only module that imports luigi.

Each task wires its inputs to one stage function and names the artifact it
produces; the work itself lives in the stage modules. Under ``--output-root``:

    raw/            gs:// inputs, downloaded and verified   (Download)
    images/         image records Parquet                    (Ingest)
    embeddings/     [CLS] and DCT features Parquet           (Embed)
    model/          classifier, label map, backbone reference (Train)
    eval/           the held-out split as files + labels     (EvalSet)
    submission.csv  one class_id per observation             (Predict)
    metrics.json    SnakeCLEF scores                         (Evaluate)
    plots/          UMAP projections, confusion matrix       (Umap, Evaluate)

Run the whole chain with::

    luigi --module snakeclef.workflow Pipeline --local-scheduler \\
        --dataset PATH --backbone PATH_OR_NAME --output-root PATH
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import luigi
from luigi.util import inherits

from snakeclef import storage

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _load_default_config() -> None:
    """Put ``conf/luigi.cfg`` first in Luigi's search path, so every other config file overrides it."""
    default = CONF_DIR / "luigi.cfg"
    if not default.is_file():
        return
    parser = luigi.configuration.LuigiConfigParser
    # NOTE: Luigi has no public call to add a lowest-priority file; its public
    # add_config_path appends, which would override the user's own luigi.cfg.
    if str(default) not in parser._config_paths:
        parser._config_paths.insert(0, str(default))
        parser.reload()


def _configure_logging() -> None:
    """Show this package's info logs under the luigi command, which only sets up its own logger."""
    package_logger = logging.getLogger("snakeclef")
    if package_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)


_load_default_config()
_configure_logging()


class spark(luigi.Config):
    """Spark settings shared by the tasks that need a SparkSession."""

    master = luigi.Parameter(default="", description="Spark master URL; empty means conf/spark.conf or local[*].")


def get_spark():
    from snakeclef.spark import get_spark as build

    return build(master=spark().master or None)


class MarkerTarget(luigi.Target):
    """A file (local or gs://) whose existence marks a finished output."""

    def __init__(self, path: str):
        self.path = path

    def exists(self) -> bool:
        return storage.exists(self.path)


class PathListParameter(luigi.Parameter):
    """A list of paths, given as a JSON list or as comma-separated paths."""

    def parse(self, value):
        value = value.strip()
        if value.startswith("["):
            return tuple(json.loads(value))
        return tuple(part.strip() for part in value.split(",") if part.strip())

    def serialize(self, value):
        return json.dumps(list(value))

    def normalize(self, value):
        if isinstance(value, str):
            return self.parse(value)
        return tuple(value or ())


def work_dir_for(output_root: str) -> Path:
    """Local folder that mirrors a gs:// output root, for stages that need local files."""
    digest = hashlib.sha256(output_root.encode()).hexdigest()[:16]
    base = Path(os.environ.get("SNAKECLEF_WORK_DIR", Path(tempfile.gettempdir()) / "snakeclef-work"))
    return base / digest


class Stage(luigi.Task):
    """Base for the chained tasks: paths under ``output_root`` and local copies of gs:// data."""

    output_root = luigi.Parameter(description="Folder or gs:// URI that receives every stage's output.")

    def uri(self, *parts: str) -> str:
        return storage.join(self.output_root, *parts)

    def local(self, *parts: str) -> Path:
        """Local path of an artifact under the output root (a mirror folder when the root is gs://)."""
        if storage.is_gcs(self.output_root):
            return work_dir_for(self.output_root).joinpath(*parts)
        return Path(storage.strip_file_scheme(self.output_root)).joinpath(*parts)

    def fetch(self, *parts: str) -> Path:
        """Return a local copy of a finished artifact folder or file under the output root."""
        local = self.local(*parts)
        if not storage.is_gcs(self.output_root):
            return local
        if Path(parts[-1]).suffix:
            # A single file (submission.csv): the local mirror already contains it when this machine wrote it.
            if not local.is_file():
                bucket, key = storage.split_gcs(self.uri(*parts))
                local.parent.mkdir(parents=True, exist_ok=True)
                storage.make_gcs_client().bucket(bucket).blob(key).download_to_filename(str(local))
            return local
        from snakeclef.data.download import download

        download(self.uri(*parts), local)
        return local

    def publish(self, *parts: str) -> None:
        """Upload a finished local artifact to a gs:// output root; nothing to do for a local root."""
        if not storage.is_gcs(self.output_root):
            return
        local = self.local(*parts)
        if local.is_dir():
            storage.upload_folder(local, self.uri(*parts))
        else:
            bucket, key = storage.split_gcs(self.uri(*parts))
            storage.make_gcs_client().bucket(bucket).blob(key).upload_from_filename(str(local))


class Download(luigi.Task):
    """Copy a gs:// prefix (or a local folder) to a local folder, verifying every file."""

    source = luigi.Parameter(description="gs://bucket/prefix, a file:// URI or a local folder.")
    destination = luigi.Parameter(description="Local folder that receives the files.")

    def output(self):
        return MarkerTarget(storage.join(self.destination, "_SUCCESS"))

    def run(self):
        from snakeclef.data.download import download

        download(self.source, self.destination)


class InputParams:
    """Parameters naming the labelled input images; shared by every task of the chain."""

    dataset = luigi.Parameter(default="", description="Folder (or gs:// prefix) with index.csv and the images it lists.")
    archive = PathListParameter(default=(), description="Image archives (.tar, .tar.gz; local or gs://), comma-separated.")
    metadata = luigi.Parameter(default="", description="Metadata CSV for --archive: image_path, observation_id, class_id, ...")
    partitions = luigi.IntParameter(default=200, description="Number of Parquet files the image records are split into.")


class EmbedParams(InputParams):
    backbone = luigi.Parameter(default="facebook/dinov2-base", description="Hugging Face model name or local folder of a DINOv2 backbone.")
    batch_size = luigi.IntParameter(default=32, description="Images per forward pass.")
    precision = luigi.ChoiceParameter(default="auto", choices=["auto", "fp32", "bf16"], description="Backbone precision; auto picks bf16 where the device supports it.")
    device = luigi.Parameter(default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N.")
    dct_k = luigi.IntParameter(default=8, description="Keep the top-left k x k DCT coefficients of the patch tokens.")


class TrainParams(EmbedParams):
    feature = luigi.ChoiceParameter(
        default="cls_last4", choices=["cls_last4", "cls", "dct"],
        description="Feature column the classifier reads: the [CLS] tokens of the last four blocks, of the last block only, or the DCT.",
    )
    learning_rate = luigi.FloatParameter(default=0.0, description="Adam learning rate; 0 runs Lightning's learning-rate finder.")
    max_epochs = luigi.IntParameter(default=100, description="Upper bound on training epochs (early stopping usually ends sooner).")
    label_smoothing = luigi.FloatParameter(default=0.1, description="Label smoothing epsilon of the training loss; 0 for the plain NLL.")
    seed = luigi.IntParameter(default=0, description="Seed for the split, initialisation and data order.")
    eval_split = luigi.Parameter(default="val", description="Value of the split column held out for prediction and scoring; never trained or validated on.")


class PredictParams(TrainParams):
    aggregate = luigi.ChoiceParameter(default="mode", choices=["mode", "mean"], description="How image predictions combine into one per observation.")
    decision = luigi.ChoiceParameter(default="argmax", choices=["argmax", "min-cost"], description="argmax, or the class with the lowest expected SnakeCLEF cost.")
    venomous_list = luigi.Parameter(default="", description="CSV of class_id with MIVS or venomous (0/1); default DATASET/venomous_status.csv, else the records' venomous column.")
    flip_tta = luigi.BoolParameter(
        default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING,
        description="Average each image's probabilities with its mirror image's (two backbone passes); --flip-tta false turns it off.",
    )


def _download_folder(task: Stage, uri: str) -> Path:
    """Local folder that Download fills with a gs:// prefix or object: ``raw/<bucket>/<key>``."""
    bucket, key = storage.split_gcs(uri)
    return task.local("raw", bucket, key)


def _raw_path(task: Stage, uri: str, *, is_file: bool = False) -> Path:
    """Local path of an input: itself, or where Download puts a gs:// one.

    Download writes a single object inside its own folder (so two inputs
    never share a ``_SUCCESS`` marker): ``raw/<bucket>/<key>/<name>``.
    """
    if not storage.is_gcs(uri):
        return Path(storage.strip_file_scheme(uri))
    folder = _download_folder(task, uri)
    return folder / uri.rstrip("/").rsplit("/", 1)[-1] if is_file else folder


# Parameters that change how a stage runs but not what it writes.
RUN_ONLY_PARAMS = frozenset({"output_root", "output", "batch_size", "device"})
SETTINGS_DIR = "_settings"


def _parameter_names(params_class: type) -> set[str]:
    return {name for klass in params_class.__mro__ for name, value in vars(klass).items() if isinstance(value, luigi.Parameter)}


class ChainedStage(Stage):
    """A stage of the main job: it records the settings its output was made with and rejects a run with other ones.

    Completeness goes by fixed paths under the output root, so without the
    record a rerun with, say, another ``--feature`` would find ``model/``
    complete and silently keep the old model.
    """

    # The parameter mixin (and extra names) whose values shape this stage's output; None records nothing.
    settings_params: type | None = None
    extra_settings: tuple[str, ...] = ()

    def upstream(self, task_class: type[luigi.Task], **overrides) -> luigi.Task:
        """Instantiate an upstream task with the parameters it shares with this one."""
        names = {name for name, _ in task_class.get_params()}
        kwargs = {name: value for name, value in self.param_kwargs.items() if name in names}
        return task_class(**{**kwargs, **overrides})

    def settings(self) -> dict[str, str]:
        """Return the parameters that shape this stage's output, as Luigi writes them on the command line."""
        names = (_parameter_names(self.settings_params) | set(self.extra_settings)) - RUN_ONLY_PARAMS
        return {name: value for name, value in self.to_str_params().items() if name in names}

    def settings_uri(self) -> str:
        return self.uri(SETTINGS_DIR, f"{self.task_family}.json")

    def complete(self) -> bool:
        if not super().complete():
            return False
        if self.settings_params is None or not self.output_root or not storage.exists(self.settings_uri()):
            # Outputs written before settings were recorded are taken as they are.
            return True
        recorded = json.loads(storage.read_text(self.settings_uri()))
        changed = {name: (recorded[name], value) for name, value in self.settings().items() if name in recorded and recorded[name] != value}
        if changed:
            differences = ", ".join(f"--{name.replace('_', '-')} {old!r} (now {new!r})" for name, (old, new) in changed.items())
            raise ValueError(
                f"The {self.task_family} output under {self.output_root} (marker {self.output().path}) was made with "
                f"{differences}. Give a new --output-root for the new settings, or delete that output and the later "
                "stages' outputs to recompute them."
            )
        return True

    def on_success(self):
        if self.settings_params is not None and self.output_root:
            storage.write_text(self.settings_uri(), json.dumps(self.settings(), indent=1, sort_keys=True) + "\n")
        return super().on_success()


class Ingest(InputParams, ChainedStage):
    """Image files and metadata -> ``images/`` Parquet of image records.

    Input is ``--dataset`` (a folder with index.csv and the images it lists)
    or ``--archive`` (one or more .tar/.tar.gz) with ``--metadata``. gs://
    inputs are downloaded to ``raw/`` first.
    """

    settings_params = InputParams

    output_root = luigi.Parameter(default="", description="Folder or gs:// URI that receives every stage's output.")
    output = luigi.Parameter(default="", description="Output folder for the image records; default OUTPUT_ROOT/images.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # NOTE: the command line spells the destination --output, which is also
        # the name of Luigi's method; keep the value and restore the method.
        self.output_path = self.param_kwargs["output"]
        self.output = self._output_target

    def images_uri(self) -> str:
        if self.output_path:
            return self.output_path
        if not self.output_root:
            raise ValueError("Ingest needs --output or --output-root to know where to write the image records")
        return self.uri("images")

    def _output_target(self):
        return MarkerTarget(storage.join(self.images_uri(), "_SUCCESS"))

    def requires(self):
        remote = [uri for uri in (self.dataset, self.metadata, *self.archive) if storage.is_gcs(uri)]
        return [Download(source=uri, destination=str(_download_folder(self, uri))) for uri in remote]

    def run(self):
        from snakeclef.data import ingest

        if bool(self.dataset) == bool(self.archive):
            raise ValueError("Ingest needs exactly one input: --dataset FOLDER, or --archive FILES with --metadata CSV")
        if self.archive and not self.metadata:
            raise ValueError("--archive needs --metadata: the CSV that gives each image's observation_id and labels")

        with storage.local_staging(self.images_uri()) as staging:
            if self.dataset:
                ingest.ingest_folder(_raw_path(self, self.dataset), staging, partitions=self.partitions, destination=self.images_uri())
            else:
                archives = [_raw_path(self, uri, is_file=True) for uri in self.archive]
                metadata = _raw_path(self, self.metadata, is_file=True)
                ingest.ingest_archives(archives, metadata, staging, partitions=self.partitions, destination=self.images_uri())


class Embed(EmbedParams, ChainedStage):
    """``images/`` -> ``embeddings/``: [CLS] and DCT features per image, computed on Spark."""

    settings_params = EmbedParams

    def requires(self):
        return self.upstream(Ingest)

    def output(self):
        return MarkerTarget(self.uri("embeddings", "_SUCCESS"))

    def run(self):
        from snakeclef.embed import embed_images

        images = self.fetch("images")
        embeddings = self.local("embeddings")
        embed_images(
            get_spark(),
            str(images),
            str(embeddings),
            backbone=self.backbone,
            batch_size=self.batch_size,
            precision=self.precision,
            device=self.device,
            dct_k=self.dct_k,
        )
        self.publish("embeddings")


class Umap(EmbedParams, ChainedStage):
    """``embeddings/`` -> ``plots/umap_*.png`` and ``plots/separation.json``."""

    settings_params = EmbedParams
    extra_settings = ("species", "seed")

    species = PathListParameter(default=(), description="Binomial names to plot (comma-separated); default the built-in list.")
    seed = luigi.IntParameter(default=0, description="Seed for UMAP.")

    def requires(self):
        return self.upstream(Embed)

    def output(self):
        return MarkerTarget(self.uri("plots", "separation.json"))

    def run(self):
        from snakeclef import embedding_plots

        options = {"species": list(self.species)} if self.species else {}
        plots = self.local("plots")
        plots.mkdir(parents=True, exist_ok=True)
        embedding_plots.plot_embeddings(str(self.fetch("embeddings")), plots, seed=self.seed, **options)
        self.publish("plots")


class Train(TrainParams, ChainedStage):
    """``embeddings/`` -> ``model/``: linear classifier, label map and backbone reference."""

    settings_params = TrainParams

    def requires(self):
        return self.upstream(Embed)

    def output(self):
        return MarkerTarget(self.uri("model", "_SUCCESS"))

    def run(self):
        from snakeclef.train import train_classifier

        train_classifier(
            str(self.fetch("embeddings")),
            str(self.local("model")),
            feature=self.feature,
            learning_rate=self.learning_rate or None,
            max_epochs=self.max_epochs,
            label_smoothing=self.label_smoothing,
            seed=self.seed,
            holdout_split=self.eval_split,
        )
        self.publish("model")


class EvalSet(PredictParams, ChainedStage):
    """``images/`` -> ``eval/``: the held-out split as image files, test metadata and ground truth."""

    settings_params = InputParams
    extra_settings = ("eval_split",)

    def requires(self):
        return self.upstream(Ingest)

    def output(self):
        return MarkerTarget(self.uri("eval", "_SUCCESS"))

    def run(self):
        from snakeclef.data.evalset import write_eval_set

        write_eval_set(self.fetch("images"), self.local("eval"), split=self.eval_split)
        self.publish("eval")


def _venomous_list(task: Stage) -> Path | None:
    """Return a local venomous list: --venomous-list, else DATASET/venomous_status.csv, else the eval set's flags from the records."""
    if task.venomous_list:
        return _local_file(task, task.venomous_list)
    if task.dataset:
        # A gs:// dataset has been downloaded whole to raw/ by then.
        default = _raw_path(task, task.dataset) / "venomous_status.csv"
        if default.is_file():
            return default
    from_records = task.local("eval", "venomous_status.csv")
    return from_records if from_records.is_file() else None


class Predict(PredictParams, ChainedStage):
    """``model/`` + ``eval/`` -> ``submission.csv`` through the offline predictor."""

    settings_params = PredictParams

    def requires(self):
        return {"model": self.upstream(Train), "eval": self.upstream(EvalSet)}

    def output(self):
        return MarkerTarget(self.uri("submission.csv"))

    def run(self):
        from snakeclef.predict import predict_submission

        eval_dir = self.fetch("eval")
        venomous = _venomous_list(self)
        if self.decision == "min-cost" and not venomous:
            raise ValueError("--decision min-cost needs --venomous-list (a CSV of class_id and MIVS or venomous)")
        predict_submission(
            eval_dir / "metadata.csv",
            eval_dir / "images",
            self.fetch("model"),
            self.local("submission.csv"),
            aggregate=self.aggregate,
            decision=self.decision,
            venomous_list=venomous,
            batch_size=self.batch_size,
            device=self.device,
            precision=self.precision,
            flip_tta=self.flip_tta,
        )
        self.publish("submission.csv")


def _local_file(task: Stage, uri: str) -> Path:
    """Return a local copy of a small input file that may be a gs:// URI."""
    if not storage.is_gcs(uri):
        return Path(storage.strip_file_scheme(uri))
    local = _raw_path(task, uri, is_file=True)
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(storage.read_text(uri))
    return local


class Evaluate(PredictParams, ChainedStage):
    """``submission.csv`` + ground truth -> ``metrics.json``, per-species scores and a confusion matrix."""

    settings_params = PredictParams

    def requires(self):
        return {"submission": self.upstream(Predict), "eval": self.upstream(EvalSet)}

    def output(self):
        return MarkerTarget(self.uri("metrics.json"))

    def run(self):
        from snakeclef.evaluate import write_evaluation

        eval_dir = self.fetch("eval")
        venomous = _venomous_list(self)
        if not venomous:
            raise ValueError("Evaluate needs --venomous-list (a CSV of class_id and MIVS or venomous) to score venomous errors")
        write_evaluation(
            self.fetch("submission.csv"),
            eval_dir / "ground_truth.csv",
            venomous,
            output_dir=self.local(),
            plots_dir=self.local("plots"),
        )
        # metrics.json is the task's marker, so it goes up last.
        for name in ("per_species.csv", "venom_confusion.csv", "plots", "metrics.json"):
            if self.local(name).exists():
                self.publish(name)


class Pipeline(PredictParams, ChainedStage, luigi.WrapperTask):
    """The whole main job: ingest, embed, train, predict, evaluate, and the UMAP plots."""

    def requires(self):
        return [self.upstream(Evaluate), self.upstream(Umap)]
