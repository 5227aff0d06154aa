"""Structured configs: the schema every YAML under conf/ is validated against.

A key that is not declared here, or a value of the wrong type, fails when Hydra composes the
config, before any data or model is loaded. A method's schema lives next to the method
(``wise_bench/methods/<file>.py``) and is checked as soon as the method is known.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DataFormat(str, enum.Enum):
    zsre = "zsre"
    hallucination = "hallucination"
    temporal = "temporal"
    counterfact = "counterfact"


class MetricName(str, enum.Enum):
    rel = "rel"  # teacher-forced token accuracy of the new target on the edit prompt
    gen = "gen"  # same on the paraphrase
    loc = "loc"  # argmax agreement with the unedited model on the locality pair
    portability = "portability"
    ppl = "ppl"  # perplexity of the new target (Hallucination)
    ood = "ood"  # share of OOD rephrases with loss below -log 0.8 (Temporal)


class EditModeKind(str, enum.Enum):
    single = "single"
    sequential = "sequential"
    batch = "batch"
    paper_chunks = "paper_chunks"


class OnTooLong(str, enum.Enum):
    error = "error"  # stop before the weights load, naming file, record, field, tokens and limit
    skip = "skip"  # leave the record out, take the next one, count it in results.json


class OnNonFinite(str, enum.Enum):
    stop = "stop"  # flush what is computed, record "stopped" in results.json, exit code 3
    skip = "skip"  # bring back the state from before the step and record the skipped requests


class Protocol(str, enum.Enum):
    teacher_forced = "teacher_forced"  # token accuracy of the target given the gold tokens before it
    generation = "generation"  # greedy answer to the question, scored against the target as text


class GenerationContext(str, enum.Enum):
    question = "question"  # the bare prompt
    qa = "qa"  # the prompt in eval.qa_template


class LoggerKind(str, enum.Enum):
    none = "none"
    wandb = "wandb"


@dataclass
class RandomInitConfig:
    """A LLaMA-architecture model with random weights and a byte-level tokenizer, built in-process."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 2048
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub id or local directory; a relative path is looked up from the repository root first.
    name_or_path: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    dtype: DType = DType.float32
    # "auto" (or any Hugging Face device_map): spread the weights over all visible GPUs, for models
    # larger than one GPU; inputs then go to the embedding's device. null: the whole model on `device`.
    device_map: Optional[str] = None
    # Longest token sequence the run may feed the model (template + prompt + target); null: the
    # model's max_position_embeddings. Checked on every text before the weights load.
    max_length: Optional[int] = None
    random_init: Optional[RandomInitConfig] = None
    # Edited module(s) per method family, as the literature writes them, e.g.
    # {wise: "model.layers[27].mlp.down_proj", memit: ["model.layers[4].mlp.down_proj", ...]}.
    edit_layers: Dict[str, Any] = field(default_factory=dict)
    # Method hyperparameters that depend on the model (e.g. WISE's activation margins scale with the
    # size of the model's activations); method YAMLs read them with ${oc.select:model.hparams.<key>,default}.
    hparams: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    name: str = MISSING
    format: DataFormat = MISSING
    edit_file: str = MISSING  # relative to data_dir
    # Source of the "irrelevant" texts (loc + " " + loc_ans) some methods train against.
    train_file: Optional[str] = None
    # Request i trains against irrelevant text (i + train_offset) of train_file (cycled), so that a
    # split may take both its edits and its irrelevant texts from one file without overlap.
    train_offset: int = 0
    # Only the first max_records records of edit_file belong to the split (e.g. a tuning split).
    max_records: Optional[int] = None
    metrics: List[MetricName] = field(default_factory=lambda: [MetricName.rel, MetricName.gen, MetricName.loc])


@dataclass
class DataPolicyConfig:
    on_too_long: OnTooLong = OnTooLong.error  # a record with a text over model.max_length


@dataclass
class EditModeConfig:
    kind: EditModeKind = EditModeKind.sequential
    batch_size: int = 1  # requests per edit step (edit_mode=batch)
    chunk_size: int = 1  # edit_mode=paper_chunks: T consecutive requests edited from the unedited model


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.none
    project: str = "wise-bench"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list = field(default_factory=list)


@dataclass
class EvalConfig:
    batch_size: int = 32  # sequences per evaluation forward pass (length-sorted)
    max_batch_tokens: int = 16384  # and at most this many tokens (padding included) per pass
    # How answers are scored (docs/evaluation.md). teacher_forced gives the top-level keys of results
    # (comparable with papers) and always runs; generation (greedy answers scored as text) is opt-in.
    protocols: List[Protocol] = field(default_factory=lambda: [Protocol.teacher_forced])
    # Generation only: null = the longest target's token count + 8; answers are never cut to the target.
    max_new_tokens: Optional[int] = None
    stop_strings: List[str] = field(default_factory=lambda: ["\n"])  # an answer also ends at EOS
    contexts: List[GenerationContext] = field(default_factory=lambda: [GenerationContext.question])
    qa_template: str = "Question: {prompt}\nAnswer:"  # context qa; {prompt} is the question
    # Sequential/batch runs: score each request right after its own edit step (cheap), so that
    # results hold its retention (final score / score right after the edit).
    probe_after_edit: bool = True
    collapse_fraction: float = 0.5  # collapse_at: the first point whose avg is below this × the first point's
    # Teacher forcing: also count the lone space token before a target that starts with whitespace as
    # a target token, as the reference toolkit does (exact parity with published numbers; the scorer
    # name says so; docs/evaluation.md lists the records it changes).
    count_lone_space: bool = False


@dataclass
class Config:
    model: ModelConfig = MISSING
    # Validated against the chosen method's own dataclass (``Method.Config``) by ``loop.method_config``.
    method: Any = MISSING
    dataset: DatasetConfig = MISSING
    edit_mode: EditModeConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataPolicyConfig = field(default_factory=DataPolicyConfig)
    on_nonfinite: OnNonFinite = OnNonFinite.stop  # a non-finite loss or edited tensor after an edit step
    num_edits: int = 100
    eval_every: int = 25
    seed: int = 0
    checkpoint_every: int = 0  # save method state, stream position and RNG every this many edits (0: off)
    save_edited: bool = False  # store the method's state at the end (edited.pt): python -m wise_bench.evaluate <run_dir>
    resume: Optional[str] = None  # a run directory holding checkpoint.pt: continue that run
    objective: str = "avg"  # the final metric the app returns to a sweeper (e.g. Optuna)
    data_dir: str = "${oc.env:WISE_BENCH_DATA_DIR,${repo_root:}/data}"
    device: Device = Device.auto


@dataclass
class CalibrateConfig(Config):
    """``python -m wise_bench.calibrate``: the run's config plus where the measured values go."""

    out: str = "${repo_root:}/conf/calibration/${model.name}.yaml"


@dataclass
class BenchConfig(Config):
    """``python scripts/bench.py``: the run's config plus the benchmark's own keys."""

    out: str = "${hydra:runtime.output_dir}/bench.json"  # the figures as JSON
    eval_requests: int = 500  # requests scored in the evaluation timing (the first N of the dataset)
    threads: Optional[int] = None  # torch.set_num_threads; null: torch's default ($OMP_NUM_THREADS)
    # Per-edit cost of these methods on the same num_edits requests, each with its fast paths, and
    # their edits per second against the first one's (e.g. [wise, memoir, ultraedit]); [] skips it.
    compare: List[str] = field(default_factory=list)
    # Requests per edit step of a compared method (default 1; UltraEdit's turn is 100). Another method:
    # +compare_batch.<name>=<n>.
    compare_batch: Dict[str, int] = field(default_factory=lambda: {"ultraedit": 100})


def register_configs() -> None:
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT))
    ConfigStore.instance().store(name="base_config", node=Config)
    ConfigStore.instance().store(name="base_calibrate_config", node=CalibrateConfig)
    ConfigStore.instance().store(name="base_bench_config", node=BenchConfig)
