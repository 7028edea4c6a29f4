"""The job spec: one YAML file, parsed into typed dataclasses before Ray starts.

The dataclasses below *are* the schema (litgpt style): each field's type and default is the documentation,
and ``metadata`` carries the extra checks (allowed choices, positive numbers). Validation walks the raw YAML
mapping against these types and stops at the first problem with one line naming the field path, e.g.
``train.lr: expected a positive number, got "fast"``.

A job runs ``stages`` in order. A stage is a kind (prepare, train, eval…) plus optional ``set`` overrides that
apply to that stage only (a command-line ``--set`` of the same key wins over them), and ``start_from``: the name
of an earlier train stage whose model it starts from.
Multi-stage recipes (DAPT → VQA, soft-prompt stage 1 → stage 2) are one spec with several train stages.
A string value may say ``${output_dir}``: it becomes the spec's ``output_dir`` (e.g. a second prepare stage's
``data.shards: ${output_dir}/rocov2_shards``), so ``--set output_dir=…`` moves such folders along.

Parsing is pure (types, ranges, cross-field rules; no files read, no medvl module but the run layout), so a
Tune trial or a Serve replica can rebuild a spec anywhere. What needs the file system or the recipe registry
(does the search space exist, does the recipe support ``train.finetune: lora``) is :mod:`medvl.validation`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from medvl.runs import SHARDS_DIR
from medvl.storage import join

STAGE_KINDS = ("prepare", "train", "eval", "tune", "serve", "compare")


class SpecError(ValueError):
    """A spec problem, always phrased as ``<field path>: <what was expected>, got <value>``."""


class NonFiniteNumber(SpecError):
    """NaN or infinity where a number is expected: said as such, not as a failed range check (``inf`` > 0)."""


def positive(value: float) -> bool:
    return value > 0


def non_negative(value: float) -> bool:
    return value >= 0


def unit_interval(value: float) -> bool:
    return 0 <= value <= 1


CHECK_TEXT = {
    positive: "a positive number",
    non_negative: "a number ≥ 0",
    unit_interval: "a number between 0 and 1",
}


def checked(default: Any, check: typing.Callable[[Any], bool]) -> Any:
    return field(default=default, metadata={"check": check})


MODALITIES = Literal["ct", "mri", "xray", "ultrasound", "angiography", "pet"]
# The dataset-specific row filters of DataSpec and the one format that reads each
FORMAT_OPTIONS = {"modalities": "rocov2", "frontal_only": "mimic_cxr", "max_studies": "mimic_cxr"}


@dataclass
class DataSpec:
    format: Literal["synthetic", "roco", "rocov2", "mimic_cxr", "iu_xray", "vqa_rad", "slake", "shards"] = "synthetic"
    source: str = ""  # the dataset's folder in its published layout (not used by "synthetic")
    shards: str = ""  # where prepared shards go / are read from: folder or s3:// URL; default <output_dir>/shards
    task: Literal["caption", "vqa"] = "caption"
    image_size: int = checked(384, positive)  # model input resolution (square)
    max_text_length: int = checked(64, positive)  # tokens of target text (caption/report/answer)
    max_question_length: int = checked(32, positive)
    synthetic_images: int = checked(2000, positive)  # synthetic: number of images generated
    synthetic_image_size: int = checked(256, positive)
    # Used when the data has no split (and train:val to carve validation from a train-only official split)
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    # A patient/image in two of the dataset's own splits: refuse (prepare fails), or report (keep the official
    # split, record the overlap in the manifest; for benchmarks that share images, such as VQA-RAD's test set)
    leakage_check: Literal["refuse", "report"] = "refuse"
    records_per_shard: int = checked(2048, positive)
    preprocess_workers: int = checked(1, positive)  # Ray Data actors decoding/tokenising for training
    preprocess_cpus: float = checked(0.25, positive)  # CPUs reserved per actor (one pool each for train and val)
    shuffle_buffer: int = checked(1024, non_negative)  # rows in the local shuffle buffer while training
    language: str = "en"  # SLAKE question language
    # rocov2: keep only images of these modalities, read from the split's concepts files (UMLS CUIs: ct C0040405,
    # mri C0024485, xray C1306645 / C0034571, ultrasound C0041618, angiography C0002978, pet C0032743); [] = all
    modalities: list[MODALITIES] = field(default_factory=list)
    frontal_only: bool = False  # mimic_cxr: PA and AP views only (ViewPosition of mimic-cxr-2.0.0-metadata.csv)
    max_studies: int = checked(0, non_negative)  # mimic_cxr: the first N studies with a findings section; 0 = all
    # Ignore the dataset's own split and split by group_id (the patient, where the dataset has one) with
    # split_fractions, as for data without a split
    resplit: bool = False
    endpoint_url: str = ""  # S3-compatible endpoint; "" = AWS or the AWS_ENDPOINT_URL environment variable
    seed: int = 0


@dataclass
class ModelSpec:
    recipe: str = "blip_caption"  # a name of medvl/models/registry.py (checked by medvl.validation)
    name_or_path: str = "Salesforce/blip-image-captioning-base"  # hub id or local folder, loaded with from_pretrained
    # "tiny": random weights from a small config + a locally trained tokenizer; "random": name_or_path's real
    # architecture (shipped config numbers, no download) with random weights, for throughput and memory work
    preset: Literal["", "tiny", "random"] = ""
    # Weights as loaded for train, eval and serve; auto: bfloat16 on a GPU that has it, float32 elsewhere.
    # Frozen weights stay in it; trainable ones train in float32 (DDP) or through DeepSpeed's fp32 master copy.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_in_8bit: bool = False  # blip2 + LoRA: base weights in 8-bit (CUDA and bitsandbytes)
    load_in_4bit: bool = False  # blip2 + LoRA: base weights in 4-bit NF4, i.e. QLoRA (CUDA and bitsandbytes)
    lora_r: int = checked(16, positive)
    lora_alpha: float = checked(32.0, positive)
    lora_dropout: float = checked(0.1, unit_interval)
    # [] = the recipe picks per model type (BLIP-2/OPT: q_proj, k_proj; GPT-2: c_attn; LLaMA: q_proj, v_proj)
    lora_target_modules: list[str] = field(default_factory=list)
    vision_name_or_path: str = "microsoft/resnet-50"  # soft-prompt recipe: the vision encoder
    lm_lora: bool = True  # soft-prompt recipe: LoRA on a frozen LM (true) or the whole LM trains (false)
    num_prefix_tokens: int = checked(10, positive)  # soft-prompt recipe: visual prefix length
    distill: bool = False  # BLIP DAPT: progressive self-distillation from an EMA teacher
    ema_tau_start: float = checked(0.95, unit_interval)  # EMA teacher momentum, rising linearly over training…
    ema_tau_end: float = checked(0.995, unit_interval)  # …to this value
    # BLIP DAPT: ITC negatives from a queue of momentum-encoder features (BLIP's own ITC); 0 = in-batch only
    itc_queue_size: int = checked(0, non_negative)

    @property
    def quantisation(self) -> str:
        """The bitsandbytes quantisation asked for: "8bit", "4bit" or ""."""
        return "8bit" if self.load_in_8bit else "4bit" if self.load_in_4bit else ""


@dataclass
class DeepSpeedSpec:
    """ZeRO settings; batch size, accumulation, clipping, lr and precision come from ``train`` (one source of truth)."""

    stage: Literal[2, 3] = 2  # 2: optimizer state + gradients partitioned; 3: parameters too (7B models)
    offload_optimizer: bool = False  # optimizer state in CPU RAM (compiles DeepSpeedCPUAdam on first use)
    offload_params: bool = False  # stage 3 only: parameters in CPU RAM between uses
    activation_checkpointing: bool = False  # old name of train.gradient_checkpointing (either turns it on)
    config_file: str = ""  # a DeepSpeed JSON merged over the derived config (keys the spec sets are refused)


@dataclass
class TrainSpec:
    epochs: int = checked(3, positive)
    max_steps: int = checked(0, non_negative)  # optimizer steps; 0 = no limit beyond epochs
    batch_size: int = checked(8, positive)  # per worker, per micro-batch
    grad_accum: int = checked(1, positive)
    lr: float = checked(5e-5, positive)
    weight_decay: float = checked(0.01, non_negative)
    warmup_ratio: float = checked(0.05, unit_interval)
    warmup_start_lr: float = checked(0.0, non_negative)  # warm-up rises linearly from it to lr…
    min_lr: float = checked(0.0, non_negative)  # …then the cosine decays from lr to it
    max_grad_norm: float = checked(1.0, positive)
    # auto: bf16 on a capable GPU (or whatever low precision model.dtype names), else fp32; fp16 without
    # DeepSpeed scales the loss with a GradScaler (DeepSpeed scales it itself)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Recompute activations in backward instead of keeping them (less memory, ~30 % more compute), any strategy
    gradient_checkpointing: bool = False
    # What trains: full | decoder | encoder (BLIP captioning) | frozen_vision (all but the vision encoder) | lora
    finetune: Literal["full", "decoder", "encoder", "frozen_vision", "lora"] = "full"
    early_stopping_patience: int = checked(2, non_negative)  # validations without improvement; 0 = off
    eval_every_steps: int = checked(0, non_negative)  # validate every N optimizer steps; 0 = once per epoch
    max_val_batches: int = checked(0, non_negative)  # cap validation cost; 0 = whole split
    val_batch_size: int = checked(0, non_negative)  # per worker; 0 = batch_size
    workers: int = checked(1, positive)
    cpus_per_worker: float = checked(1.0, positive)
    torch_threads: int = checked(0, non_negative)  # intra-op threads per worker; 0 = ceil(cpus_per_worker)
    use_gpu: bool = False
    num_checkpoints_to_keep: int = checked(2, positive)
    max_failures: int = checked(0, non_negative)
    storage_path: str = ""  # Ray Train checkpoints: folder or s3:// URL; "" = <output_dir>/checkpoints
    strategy: Literal["ddp", "deepspeed"] = "ddp"  # deepspeed: ZeRO partitioning, see train.deepspeed
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    seed: int = 0

    @property
    def checkpoints_activations(self) -> bool:
        """train.gradient_checkpointing, or its old DeepSpeed-only name train.deepspeed.activation_checkpointing."""
        return self.gradient_checkpointing or self.deepspeed.activation_checkpointing


@dataclass
class EvalSpec:
    split: Literal["train", "val", "test"] = "test"
    num_beams: int = checked(4, positive)
    max_new_tokens: int = checked(64, positive)
    batch_size: int = checked(32, positive)
    max_samples: int = checked(0, non_negative)  # 0 = the whole split
    semantic: bool = True  # BERTScore + embedding cosine with embedding_model (~70 s per 1,000 pairs on 2 CPUs)
    # A local sentence-transformers folder (its pooling is used) or a plain HF encoder folder (mean pooling);
    # "" = all-MiniLM-L6-v2 shipped on PyPI
    embedding_model: str = ""
    clinical: bool = True  # CheXpert clinical efficacy, hallucination and laterality (chest X-ray reports)
    worst_examples: int = checked(10, non_negative)  # listed in report.md
    # PNG overlays of the decoder's cross-attention on the image for the first N samples (<stage>/attention/);
    # BLIP captioning recipes only, 0 = none
    attention_maps: int = checked(0, non_negative)
    # Extra scores written to <output_dir>/<name>.json next to the trained model's: "untrained" (the model the
    # train stage started from), "zero_shot" (that model generating after eval.prompt) and "shuffled_images"
    # (predictions scored against other images' references).
    baselines: list[Literal["untrained", "zero_shot", "shuffled_images"]] = field(default_factory=list)
    prompt: str = ""  # the zero_shot baseline's text prompt; the trained model generates without one
    # Generation runs in a Ray Data pool of this many actors, each holding the model (and the untrained
    # baseline's) in model.dtype on these resources; the driver only gathers predictions and scores them.
    workers: int = checked(1, positive)
    num_gpus: float = checked(0.0, non_negative)  # per actor; fractions share a GPU
    num_cpus: float = checked(1.0, positive)  # per actor (also its torch threads, at least one)
    # METEOR and the PTB tokenizer run on Java: without `java`, true fails before generating, false scores
    # every other metric (tokenized in Python) and writes meteor_unavailable with the reason
    require_java: bool = True
    # Temperature scaling (medvl.eval.calibration): fit the model's confidence temperature on the first
    # calibration_samples validation rows (in the eval actor pool) unless its folder has one, report token-level
    # ECE before and after on the eval split, and score every confidence with it. On for every task: report
    # models (the case) and VQA and caption models alike; every recipe has the teacher-forced view it
    # needs, and the fit costs one forward pass over at most calibration_samples rows.
    calibrate: bool = True
    calibration_samples: int = checked(256, positive)


def above_one(value: float) -> bool:
    return value > 1


CHECK_TEXT[above_one] = "a number > 1"


@dataclass
class TuneSpec:
    """A hyperparameter search (``medvl tune``, a ``tune`` stage): one Ray Train run per trial, ASHA on top."""

    # A tune_spaces/*.yaml file: a path (relative to the working directory) or a file of the shipped tune_spaces/
    space: str = ""
    metric: str = "val_loss"  # reported by every validation of the training loop
    mode: Literal["min", "max"] = "min"
    num_samples: int = checked(1, positive)  # grid: repeats of the whole grid; random: draws (grids crossed in)
    search_alg: Literal["grid", "random", "optuna"] = "grid"  # optuna only where its package is installed
    scheduler: Literal["asha", "none"] = "asha"
    # ASHA's unit is the optimizer step: trials report at every validation (tune.eval_every_steps below)
    grace_period: int = checked(250, positive)  # steps before ASHA may stop a trial (the published protocol: 250)
    reduction_factor: float = checked(3.0, above_one)  # ASHA keeps the best 1/reduction_factor at each rung
    max_steps: int = checked(0, non_negative)  # ASHA's max_t, and each trial's train.max_steps cap; 0 = planned
    eval_every_steps: int = checked(0, non_negative)  # trials validate every N steps; 0 = train.eval_every_steps
    # What one trial's Train workers get in all (split evenly over train.workers); fractions are fine.
    cpus_per_trial: float = checked(0.0, non_negative)  # 0 = train.workers × train.cpus_per_worker
    gpus_per_trial: float = checked(0.0, non_negative)  # > 0 needs train.use_gpu; e.g. 0.5 = two trials per GPU
    max_concurrent_trials: int = checked(0, non_negative)  # 0 = as many as the cluster's CPUs (and GPUs) fit


def port_number(value: int) -> bool:
    return 0 < value < 65536


CHECK_TEXT[port_number] = "a port number (1–65535)"


@dataclass
class ServeSpec:
    """``medvl serve`` (or a ``serve`` stage): one Ray Serve deployment answering POST /v1/<the recipe's endpoint>."""

    # "" = the model of the spec's last train (or tune) stage; else an HF model folder, a peft adapter folder, or
    # a train / tune stage's folder (its summary names the model), local or a URL (s3://…, fetched per replica);
    # hf://<org>/<name> for a Hub model
    checkpoint: str = ""
    host: str = "127.0.0.1"
    port: int = checked(8000, port_number)
    api_key_env: str = ""  # name of the environment variable holding the API key; "" = no key asked
    num_replicas: int = checked(1, positive)  # fixed replica count, used while autoscaling is off
    autoscaling_min_replicas: int = checked(0, non_negative)
    autoscaling_max_replicas: int = checked(0, non_negative)  # 0 = autoscaling off
    autoscaling_target_ongoing_requests: float = checked(0.0, non_negative)  # per replica; 0 = max_batch_size
    num_cpus: float = checked(1.0, non_negative)  # per replica (also its torch threads, at least one)
    num_gpus: float = checked(0.0, non_negative)  # per replica; fractions share a GPU
    max_batch_size: int = checked(16, positive)  # requests generated together (@serve.batch)
    batch_wait_timeout_s: float = checked(0.01, non_negative)  # how long a batch waits to fill up
    max_ongoing_requests: int = checked(0, non_negative)  # per replica; 0 = 2 × max_batch_size
    max_image_bytes: int = checked(10_000_000, positive)  # encoded image; larger uploads get 413
    max_image_pixels: int = checked(40_000_000, positive)  # W × H (× DICOM frames × samples) per header; more: 413
    max_question_chars: int = checked(1000, positive)
    num_beams: int = checked(0, non_negative)  # 0 = eval.num_beams
    max_new_tokens: int = checked(0, non_negative)  # 0 = eval.max_new_tokens
    # Many LoRA adapters on one base (Ray Serve model multiplexing): adapter folders, or ["top:K"] = the K best
    # trials of the spec's tune stage; [] = serve.checkpoint alone. A request picks one by "model" / the
    # serve_multiplexed_model_id header.
    adapters: list[str] = field(default_factory=list)
    max_adapters_per_replica: int = checked(4, positive)  # kept loaded per replica (least recently used go)
    # the weights' dtype in the replica, for serving in another precision than trained/evaluated ("" = model.dtype)
    dtype: Literal["", "auto", "bfloat16", "float16", "float32"] = ""


@dataclass
class RaySpec:
    # "" = a fresh local Ray inside this process (even beside a running `ray start`); "auto" = the Ray that
    # `ray start` left on this machine; host:port or ray://host:port for a cluster
    address: str = ""
    num_cpus: int = checked(0, non_negative)  # local Ray only; 0 = all cores
    connect_timeout_s: float = checked(60.0, positive)  # joining only: fail (one line) when the address stays silent
    # On a cluster whose autoscaler adds nodes: how long a stage waits for the GPUs/CPUs it asks for before
    # failing (a Ray without an autoscaler fails at once)
    resource_wait_s: float = checked(900.0, non_negative)


def tracking_uri(value: str) -> bool:
    return value == "" or "://" in value or value.startswith("databricks")


CHECK_TEXT[tracking_uri] = 'an MLflow tracking URI (http://…, sqlite:///…, file:///…) or "" for the run\'s own store'


@dataclass
class TrackingSpec:
    """What a run records (MLflow, TensorBoard, W&B) and how it shows its progress."""

    enabled: bool = True  # MLflow: a parent run per `medvl` command, a child run per stage and per Tune trial
    # "" = a SQLite store <output_dir>/mlflow.db with artifacts in <output_dir>/mlartifacts (offline, no server);
    # any MLflow tracking URI (http://host:5000 for a team's server)
    uri: str = checked("", tracking_uri)
    experiment: str = ""  # MLflow experiment; "" = the job's name
    tensorboard: bool = False  # also TensorBoard event files in <output_dir>/tensorboard/<stage>/
    wandb: bool = True  # also Weights & Biases, only where the wandb package and WANDB_API_KEY are present
    log_every_steps: int = checked(10, positive)  # training metrics (loss, lr, grad norm, throughput) every N steps
    progress_every_s: float = checked(30.0, positive)  # when stdout is not a terminal: one progress line this often


@dataclass
class CompareSpec:
    """A ``compare`` stage: the job's train and eval stages side by side in <output_dir>/comparison.md (+ .png)."""

    metrics: list[str] = field(default_factory=list)  # eval metrics to show; [] = the task's headline metrics


@dataclass
class StageSpec:
    kind: Literal["prepare", "train", "eval", "tune", "serve", "compare"]
    name: str = ""  # defaults to kind; outputs go to <output_dir>/<name>
    start_from: str = ""  # name of an earlier train stage whose final model this stage starts from
    set: dict[str, Any] = field(default_factory=dict)  # dotted overrides for this stage only


@dataclass
class JobSpec:
    name: str
    output_dir: str
    stages: list[StageSpec]
    data: DataSpec = field(default_factory=DataSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    ray: RaySpec = field(default_factory=RaySpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    serve: ServeSpec = field(default_factory=ServeSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    compare: CompareSpec = field(default_factory=CompareSpec)

    @property
    def shards_location(self) -> str:
        return self.data.shards or join(self.output_dir, SHARDS_DIR)

    def for_stage(self, stage: StageSpec) -> "JobSpec":
        """This spec with the stage's ``set`` overrides applied (validated like the file itself)."""
        if not stage.set:
            return self
        raw = dataclasses.asdict(self)
        for other in raw["stages"]:
            other["set"] = {}  # the result describes this stage's settings; other stages' overrides do not apply
        for key, value in stage.set.items():
            set_dotted(raw, key, value, where=f"stages.{stage.name}.set")
        return parse_spec(raw)


# --------------------------------------------------------------------------------------------- parsing


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML spec, apply ``key.path=value`` overrides, validate. Raises SpecError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for override in overrides or []:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {override}: expected key.path=value")
        key, value = key.strip(), yaml.safe_load(text) if text else ""
        set_dotted(raw, key, value, where="--set")
        _override_stage_sets(raw, key, value)
    return parse_spec(raw)


def _override_stage_sets(raw: dict, key: str, value: Any) -> None:
    """The command line has the last word: a ``--set`` key also replaces that key in every stage's ``set``."""
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict) and isinstance(stage.get("set"), dict) and key in stage["set"]:
            stage["set"][key] = value


def set_dotted(raw: dict, dotted: str, value: Any, where: str) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"{where} {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


OUTPUT_DIR_VARIABLE = "${output_dir}"


def parse_spec(raw: dict) -> JobSpec:
    raw = _expand_output_dir(copy.deepcopy(raw))
    raw["stages"] = [_normalise_stage(s, i) for i, s in enumerate(raw.get("stages") or [])]
    spec = _build(JobSpec, raw, "")
    _check_stages(spec)
    _check_cross_fields(spec)
    return spec


def _expand_output_dir(raw: dict) -> dict:
    """``${output_dir}`` in any string value (stage ``set`` values too) becomes the spec's output_dir, so a stage can
    name a folder of the job's own (e.g. a second shard location) and ``--set output_dir=…`` moves it along."""
    output_dir = raw.get("output_dir")
    if not isinstance(output_dir, str) or OUTPUT_DIR_VARIABLE in output_dir:
        return raw

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(OUTPUT_DIR_VARIABLE, output_dir)
        if isinstance(value, dict):
            return {key: expand(item) for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item) for item in value]
        return value

    return expand(raw)


def _normalise_stage(stage: Any, index: int) -> Any:
    if isinstance(stage, str):
        return {"kind": stage}
    if isinstance(stage, dict) and "kind" not in stage and "name" in stage and stage["name"] in STAGE_KINDS:
        return {**stage, "kind": stage["name"]}
    return stage


def _check_stages(spec: JobSpec) -> None:
    if not spec.stages:
        raise SpecError("stages: expected a non-empty list of stages, got []")
    seen_train: set[str] = set()
    names: set[str] = set()
    for i, stage in enumerate(spec.stages):
        stage.name = stage.name or stage.kind
        if stage.name in names:
            raise SpecError(f"stages[{i}].name: expected a unique stage name, got {stage.name!r} twice")
        names.add(stage.name)
        if stage.start_from and stage.start_from not in seen_train:
            raise SpecError(
                f"stages[{i}].start_from: expected the name of an earlier train stage, got {stage.start_from!r}"
            )
        if stage.set:
            try:
                spec.for_stage(stage)
            except SpecError as exc:
                raise SpecError(f"stages[{i}].set: {exc}") from None
        if stage.kind == "train":
            seen_train.add(stage.name)


def _check_cross_fields(spec: JobSpec) -> None:
    fractions = spec.data.split_fractions
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SpecError(f"data.split_fractions: expected three numbers ≥ 0 summing to 1, got {fractions}")
    if spec.data.format not in ("synthetic", "shards") and not spec.data.source:
        raise SpecError(f"data.source: expected the dataset folder for format {spec.data.format!r}, got \"\"")
    if not spec.output_dir:
        raise SpecError('output_dir: expected a folder or a URL such as s3://bucket/runs/job, got ""')
    if spec.model.preset == "" and not spec.model.name_or_path:
        raise SpecError('model.name_or_path: expected a hub id or local folder (or model.preset: tiny), got ""')
    if spec.model.preset == "random" and not spec.model.name_or_path:
        raise SpecError('model.name_or_path: expected the hub id whose architecture model.preset: random builds '
                        '(e.g. Salesforce/blip2-opt-2.7b), got ""')
    _check_data_filters(spec)
    _check_quantisation(spec)
    _check_schedule(spec)
    _check_eval(spec)
    _check_deepspeed(spec)
    _check_precision(spec)
    _check_tune(spec)
    _check_serve(spec)


def _check_data_filters(spec: JobSpec) -> None:
    """A row filter needs the format that reads it; synthetic data (every smoke test's stand-in) ignores them."""
    data = spec.data
    if data.resplit and data.format == "shards":
        raise SpecError("data.resplit: expected false with data.format shards (splits are made at prepare), got true")
    defaults = DataSpec()
    for name, owner in FORMAT_OPTIONS.items():
        value = getattr(data, name)
        if value != getattr(defaults, name) and data.format not in (owner, "synthetic"):
            raise SpecError(f"data.{name}: expected it unset with data.format {data.format} (only {owner} reads it), "
                            f"got {_show(value)}")


def _check_quantisation(spec: JobSpec) -> None:
    model = spec.model
    if model.load_in_8bit and model.load_in_4bit:
        raise SpecError("model.load_in_4bit: expected false while model.load_in_8bit is true (one quantisation), "
                        "got true")
    trains = any(stage.kind in ("train", "tune") for stage in spec.stages)
    if model.quantisation and trains and not spec.train.use_gpu:
        raise SpecError(f"model.load_in_{model.quantisation}: expected false while train.use_gpu is false "
                        f"(bitsandbytes' {model.quantisation} weights need a CUDA GPU), got true")


def _check_schedule(spec: JobSpec) -> None:
    train = spec.train
    for name in ("warmup_start_lr", "min_lr"):
        if getattr(train, name) > train.lr:
            raise SpecError(f"train.{name}: expected at most train.lr ({train.lr:g}), got {getattr(train, name):g}")


def _check_eval(spec: JobSpec) -> None:
    settings = spec.eval
    zero_shot = "zero_shot" in settings.baselines
    if zero_shot and not settings.prompt.strip():
        raise SpecError('eval.prompt: expected the zero_shot baseline\'s prompt (e.g. "Describe the findings in this '
                        'chest X-ray:"), got ""')
    if settings.prompt and not zero_shot:
        raise SpecError(f"eval.prompt: expected it unset unless eval.baselines has zero_shot (only that baseline is "
                        f"prompted), got {_show(settings.prompt)}")


def _check_deepspeed(spec: JobSpec) -> None:
    settings = spec.train.deepspeed
    if settings.offload_params and settings.stage != 3:
        raise SpecError(f"train.deepspeed.offload_params: expected false unless train.deepspeed.stage is 3, "
                        f"got true with stage {settings.stage}")


LOW_PRECISION = {"bfloat16": "bf16", "float16": "fp16"}  # model.dtype → the train.precision it computes in


def _check_precision(spec: JobSpec) -> None:
    """Low-precision weights compute in their own precision: train.precision may not ask for another one."""
    needed = LOW_PRECISION.get(spec.model.dtype)
    if needed and spec.train.precision not in ("auto", needed):
        raise SpecError(f'train.precision: expected auto or {needed} with model.dtype {spec.model.dtype} (the weights '
                        f'compute in it), got "{spec.train.precision}"')


def _check_tune(spec: JobSpec) -> None:
    settings = spec.tune
    searches = any(stage.kind == "tune" for stage in spec.stages)
    if searches and not settings.space:
        raise SpecError('tune.space: expected a search space file (e.g. tune_spaces/blip2_lora.yaml) for the tune '
                        'stage, got ""')
    if not settings.metric:
        raise SpecError('tune.metric: expected the name of a reported metric (e.g. val_loss), got ""')
    if settings.scheduler == "asha" and settings.max_steps and settings.grace_period > settings.max_steps:
        raise SpecError(f"tune.grace_period: expected at most tune.max_steps ({settings.max_steps}), "
                        f"got {settings.grace_period}")
    if searches and settings.gpus_per_trial and not spec.train.use_gpu:
        raise SpecError(f"tune.gpus_per_trial: expected 0 while train.use_gpu is false, got {settings.gpus_per_trial}")


def _check_serve(spec: JobSpec) -> None:
    settings = spec.serve
    low, high = settings.autoscaling_min_replicas, settings.autoscaling_max_replicas
    if high and low > high:
        raise SpecError(f"serve.autoscaling_min_replicas: expected at most serve.autoscaling_max_replicas ({high}), "
                        f"got {low}")
    if settings.max_ongoing_requests and settings.max_ongoing_requests < settings.max_batch_size:
        raise SpecError(f"serve.max_ongoing_requests: expected 0 or at least serve.max_batch_size "
                        f"({settings.max_batch_size}: a replica never sees a fuller batch), "
                        f"got {settings.max_ongoing_requests}")
    name = settings.api_key_env
    if name and not (name.replace("_", "a").isalnum() and not name[0].isdigit()):
        raise SpecError(f"serve.api_key_env: expected the name of an environment variable, got {_show(name)}")


def _build(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{path or 'spec'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise SpecError(f"{_join(path, key)}: unknown field (expected one of: {', '.join(known)})")
    values = {}
    for name, f in known.items():
        where = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{where}: required field is missing")
            continue
        check = f.metadata.get("check")
        try:
            value = _convert(hints[name], raw[name], where)
        except NonFiniteNumber:
            raise
        except SpecError:
            if check is None:
                raise
            raise SpecError(f"{where}: expected {CHECK_TEXT[check]}, got {_show(raw[name])}") from None
        if check is not None and not check(value):
            raise SpecError(f"{where}: expected {CHECK_TEXT[check]}, got {_show(raw[name])}")
        values[name] = value
    return cls(**values)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise SpecError(f"{where}: expected one of {', '.join(repr(c) for c in choices)}, got {_show(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _convert(option, value, where)
            except NonFiniteNumber:
                raise
            except SpecError:
                continue
        raise SpecError(f"{where}: expected {hint}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {_show(value)}")
        (item_hint,) = get_args(hint)
        return [_convert(item_hint, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {_show(value)}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(f"{where}: expected a number, got {_show(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {_show(value)}")
        if not math.isfinite(value):  # YAML's .nan / .inf: NaN compares false with every bound
            raise NonFiniteNumber(f"{where}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"spec schema uses an unsupported type {hint} at {where}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing"
    return repr(value)
