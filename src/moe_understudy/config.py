"""Frozen configuration dataclasses, one per stage; YAML in, YAML out.

Every CLI option maps onto a field of the stage's dataclass; `to_yaml` / `from_yaml` round-trip
exactly, so a run can be repeated from the YAML it wrote next to its output.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C", bound="StageConfig")


class StageConfig:
    """Mixin for frozen stage configs: dict/YAML round-trip and validated replacement."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}."
            )
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})  # type: ignore[call-arg]

    @classmethod
    def from_yaml(cls: type[C], source: str | Path) -> C:
        """`source` is a YAML file path or YAML text."""
        is_path = isinstance(source, Path) or ("\n" not in source and Path(source).is_file())
        text = Path(source).read_text() if is_path else str(source)
        return cls.from_dict(yaml.safe_load(text) or {})

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _coerce(hint: Any, value: Any) -> Any:
    """YAML gives lists where a dataclass wants tuples; convert so equality round-trips."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return value if value is None or len(args) != 1 else _coerce(args[0], value)
    if isinstance(hint, type) and issubclass(hint, StageConfig) and isinstance(value, dict):
        return hint.from_dict(value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


DTYPES = ("float32", "bfloat16", "float16")  # what --dtype takes (moe/loading.py makes torch dtypes of them)
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _canonical_dtypes(cfg: StageConfig, *names: str) -> None:
    """Validate the dtype fields `names` of `cfg`, writing bf16 / fp16 / fp32 as their full names."""
    for name in names:
        value = getattr(cfg, name)
        canonical = _DTYPE_ALIASES.get(str(value).lower(), str(value).lower())
        if canonical not in DTYPES:
            raise ValueError(f"{name} must be one of {', '.join(DTYPES)}; got {value!r}.")
        object.__setattr__(cfg, name, canonical)


@dataclass(frozen=True)
class DataConfig(StageConfig):
    """Where text comes from and how it becomes token blocks."""

    source: str = "stdlib"  # "stdlib", "python" (stdlib + site-packages), a file/folder, or a datasets name
    text_field: str = "text"  # field holding text in jsonl / datasets rows
    block_size: int = 128  # tokens per packed training block
    val_fraction: float = 0.05  # fraction of files held out for validation (split by file)
    max_chars: int = 12_000_000  # cap on characters read from the corpus (keeps the default fast)
    vocab_size: int = 4096  # BPE vocabulary when a tokenizer is trained here
    tokenizer: str | None = None  # path or hub id of an existing tokenizer; None trains a BPE
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 8:
            raise ValueError(f"block_size must be at least 8, got {self.block_size}.")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}.")
        if self.vocab_size < 260:
            raise ValueError(
                f"vocab_size must be at least 260 (256 bytes + specials), got {self.vocab_size}."
            )


@dataclass(frozen=True)
class TrainRun(StageConfig):
    """What every training run (`teacher`, `sft`, `kd`) shares: its seed, where it trains, and the dtype
    its forwards compute in (autocast); the weights stay fp32 (precision.py). Subclasses define `steps`
    and `batch_size`."""

    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive.")


@dataclass(frozen=True)
class TeacherConfig(TrainRun):
    """Training a small MoE teacher from scratch (`understudy teacher`)."""

    preset: str = "mixtral"  # a name from moe.presets.PRESETS
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1400  # optimiser steps
    batch_size: int = 16  # blocks per step
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay, linear warm-up)
    warmup: int = 50  # warm-up steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # steps between held-out evaluations and checkpoints
    eval_batches: int = 20  # held-out batches per evaluation
    joint_understudy: str | None = None  # understudy arch trained jointly (detached aux loss), or None
    joint_weight: float = 1.0  # weight of the joint understudy loss
    # from this step on, overflow is served in the loop: each step's forward runs `joint_policy` at a
    # capacity factor drawn from [joint_cf_min, joint_cf_max] (score priority) with the joint stand-ins,
    # so the language-model loss reaches them and the model learns to tolerate them; None: detached only
    joint_in_loop_from: int | None = None
    joint_policy: str = "shadow"
    joint_cf_min: float = 1.0
    joint_cf_max: float = 2.0
    init_from: str | None = (
        None  # start from this saved model's weights (a continued phase), not from scratch
    )
    save_at: tuple[int, ...] = ()  # steps after which a full save_pretrained snapshot goes to OUT/at-STEP/

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.joint_in_loop_from is not None and self.joint_understudy is None:
            raise ValueError(
                "joint_in_loop_from needs joint_understudy (the stand-in that serves the overflow)."
            )
        if not 0 < self.joint_cf_min <= self.joint_cf_max:
            raise ValueError("need 0 < joint_cf_min <= joint_cf_max.")
        bad = [s for s in self.save_at if not 0 < int(s) <= self.steps]
        if bad:
            raise ValueError(f"save_at steps must be in 1..steps ({self.steps}), got {bad}.")
        object.__setattr__(self, "save_at", tuple(sorted({int(s) for s in self.save_at})))

    @classmethod
    def quick(cls) -> TeacherConfig:
        """Seconds-long teacher run on the tiny `quick` preset (`--quick`, tests, smoke checks)."""
        return cls(
            preset="quick",
            data=DataConfig(max_chars=400_000, vocab_size=512, block_size=64),
            steps=60,
            batch_size=8,
            lr=3e-3,
            warmup=10,
            eval_every=20,
            eval_batches=2,
        )


@dataclass(frozen=True)
class InspectConfig(StageConfig):
    """Per-layer expert load of a model on some text (`understudy inspect`)."""

    model: str = "runs/teacher"  # saved model folder or a transformers MoE checkpoint
    data: DataConfig = field(default_factory=DataConfig)  # text routed (its validation split)
    blocks: int = 64  # blocks of text routed
    batch_size: int = 8  # blocks per forward (the "layer-batch" of the max/mean figure)
    heatmap: str | None = None  # layer x expert load heatmap PNG, if wanted
    json_out: str | None = None  # the figures as JSON, if wanted
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # the model's dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        if self.blocks <= 0 or self.batch_size <= 0:
            raise ValueError("blocks and batch_size must be positive.")


# ---- kd ----
KD_METHODS = ("kd", "gkd", "all", "ka", "sar", "bdistill")
KD_DIVERGENCES = ("fkl", "rkl", "skew_fkl", "skew_rkl")


@dataclass(frozen=True)
class InstructionRun(TrainRun):
    """What a training run on instruction data (`sft`, `kd`) reads, validates on, and runs with."""

    data: str = ""  # instruction file (.jsonl/.json, optionally .gz; any format of data/instructions.py)
    fmt: str = "auto"  # instruction format of `data` (auto-detected from the first row)
    val_data: str | None = None  # validation file; None holds out `val_examples` rows of `data`
    val_examples: int = 64  # validation examples for checkpoint selection by ROUGE-L
    max_examples: int | None = None  # cap on training examples read (None: all)
    max_prompt: int = 256  # prompt tokens kept (cut from the left)
    max_total: int = 512  # prompt + response tokens kept
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100  # steps between validation ROUGE-L evaluations / checkpoints
    max_new_tokens: int = 64  # generation length for validation ROUGE-L

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.max_prompt < self.max_total:
            raise ValueError(f"need 0 < max_prompt < max_total, got {self.max_prompt} and {self.max_total}.")
        if self.eval_every <= 0 or self.val_examples < 0:
            raise ValueError("eval_every must be positive and val_examples non-negative.")


@dataclass(frozen=True)
class SFTConfig(InstructionRun):
    """Supervised fine-tuning on instruction data, prompt masked from the loss (`understudy sft`)."""

    model: str = "quick"  # a preset name (trained from scratch) or a saved model folder
    tokenizer: str | None = None  # tokenizer folder; None: the model folder's, or a BPE trained on `data`
    vocab_size: int = 4096  # BPE vocabulary when a tokenizer is trained here
    steps: int = 500  # optimiser steps
    batch_size: int = 16  # examples per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 20  # warm-up steps


@dataclass(frozen=True)
class KDConfig(InstructionRun):
    """Distilling a whole MoE teacher into a dense or smaller MoE student (`understudy kd`); `data` holds the
    prompts (and the responses, for KD / off-policy)."""

    teacher: str = ""  # saved teacher folder (an MoE; its tokenizer is the student's)
    student: str = "quick-student"  # a preset name (fresh) or a saved model folder sharing the tokenizer
    method: str = "kd"  # kd | gkd | all | ka | sar | bdistill (see kd/trainer.py)
    divergence: str | None = None  # fkl | rkl | skew_fkl | skew_rkl; None: fkl for kd, rkl otherwise
    on_policy: bool = True  # non-kd methods distil on student-sampled responses; False: dataset responses
    gen_max_new_tokens: int = 64  # length of student-sampled responses (on-policy)
    steps: int = 300  # optimiser steps; every method takes exactly one student update per step
    batch_size: int = 8  # prompts per step (per teacher pass for kd/gkd with teacher_passes > 1)
    lr: float = 5e-4  # peak student learning rate (linear warm-up, cosine decay to 10%)
    warmup: int = 10
    ka_experts: int | None = None  # KA: experts active per teacher layer; None means N-1
    ka_lambda: float = 0.05  # KA: per-token probability of sampling the experts instead of top-(N-1)
    # KA: teacher passes per input per step (M in EEM), their losses averaged into one update
    ka_passes: int = 2
    # kd/gkd: teacher_passes x batch_size examples per step, one teacher pass each, the sub-batch
    # losses averaged into one update: KA's teacher forwards and optimiser steps at ka_passes = this
    teacher_passes: int = 1
    sar_lr: float = 1e-4  # SAR: learning rate of the teacher-router optimiser
    sar_beta: float = 0.01  # SAR: weight of the load-balancing loss in the router step
    explore_eps: float = 0.1  # B-Distill: uniform mixing of router probabilities for MC exploration
    router_kl_weight: float = 0.1  # B-Distill: weight of the teacher->student router KL
    entropy_floor: float = 0.5  # B-Distill: entropy floor as a fraction of log(student experts)
    entropy_weight: float = 0.1  # B-Distill: weight of the entropy-floor penalty

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in KD_METHODS:
            raise ValueError(f"method must be one of {', '.join(KD_METHODS)}, got {self.method!r}.")
        if self.divergence is not None and self.divergence not in KD_DIVERGENCES:
            raise ValueError(
                f"divergence must be one of {', '.join(KD_DIVERGENCES)}, got {self.divergence!r}."
            )
        if not 0.0 <= self.ka_lambda <= 1.0 or not 0.0 <= self.explore_eps <= 1.0:
            raise ValueError("ka_lambda and explore_eps must lie in [0, 1].")
        if min(self.ka_passes, self.teacher_passes) < 1 or (
            self.ka_experts is not None and self.ka_experts < 1
        ):
            raise ValueError("ka_passes, teacher_passes and ka_experts must be at least 1.")
        if self.teacher_passes > 1 and self.method not in ("kd", "gkd"):
            raise ValueError(
                f"teacher_passes applies to kd and gkd (KA's teacher passes are ka_passes), not to {self.method}."
            )
        if self.gen_max_new_tokens < 1:
            raise ValueError("gen_max_new_tokens must be at least 1.")

    @property
    def loss_divergence(self) -> str:
        """The divergence actually used: forward KL for plain KD, reverse KL for the others unless set."""
        return self.divergence or ("fkl" if self.method == "kd" else "rkl")


@dataclass(frozen=True)
class RougeConfig(StageConfig):
    """Sampling responses and scoring ROUGE-L F1 per dataset and task (`understudy rouge`)."""

    model: str = ""  # saved model folder (with its tokenizer)
    data: tuple[str, ...] = ()  # instruction files, each scored as one dataset
    fmt: str = "auto"  # instruction format of the files
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)  # sampling seeds (mean and std over them)
    greedy: bool = False  # greedy decoding instead of sampling (one pass, seeds ignored)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling mass (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 128  # generated tokens per response (cut earlier at end-of-text)
    max_prompt: int = 256  # prompt tokens kept (cut from the left)
    batch_size: int = 16  # prompts generated together (left padding, KV cache)
    limit: int | None = None  # examples per dataset (None: all)
    out: str | None = None  # JSON report path (None: print only)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # the model's dtype: float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        if not self.data:
            raise ValueError("give at least one instruction file to score.")
        if not self.greedy and not self.seeds:
            raise ValueError("sampling needs at least one seed (or use greedy).")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0.")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive.")


# ---- understudies ----


@dataclass(frozen=True)
class CaptureConfig(StageConfig):
    """Recording per-MoE-layer activity into a store (`understudy capture`)."""

    model: str = "runs/teacher"  # saved model folder (or hub id) to capture from
    out: str = "runs/store"  # store folder: manifest.json + train/ and val/ shards
    data: DataConfig = field(default_factory=DataConfig)  # text the model reads while captured
    tokens: int = 65_536  # training tokens captured (rounded down to whole blocks)
    val_tokens: int = 8_192  # held-out tokens captured from the corpus' val split
    batch_size: int = 8  # blocks per forward pass
    shard_tokens: int = 16_384  # rows per shard file
    dtype: str = "float32"  # stored dtype of x, y, logits, weights: float32 | float16 | bfloat16
    model_dtype: str = "float32"  # dtype the model runs in while captured (--dtype sets both)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto

    def __post_init__(self) -> None:
        if self.tokens < self.data.block_size or self.val_tokens < self.data.block_size:
            raise ValueError(f"tokens and val_tokens must hold at least one block of {self.data.block_size}.")
        if self.batch_size <= 0 or self.shard_tokens <= 0:
            raise ValueError("batch_size and shard_tokens must be positive.")
        _canonical_dtypes(self, "dtype", "model_dtype")


@dataclass(frozen=True)
class EndToEndConfig(StageConfig):
    """End-to-end distillation through the frozen model with stochastic substitution.

    Defaults are the recipe of benchmarks/understudy_quality.py that cut the layer-wise perplexity
    loss by 58% on the default teacher: full substitution, lr 1e-3, a hidden-state term, and fresh
    teacher targets on a large pool (a small cached pool is memorised and barely helps).
    """

    steps: int = 0  # optimiser steps (0 = skip the end-to-end stage; 1000 in the benchmark)
    data: DataConfig = field(default_factory=DataConfig)  # text for the teacher's next-token targets
    blocks: int = 2048  # pool of training blocks the steps draw from
    cache_teacher: bool = False  # cache the pool's teacher log-probs (fp16); False recomputes them per step,
    # which lets the pool be large: a small cached pool is memorised (train KL falls, held-out KL does not)
    batch_size: int = 8  # blocks per step
    lr: float = 1e-3  # peak AdamW learning rate (linear warm-up, cosine decay)
    warmup: int = 30  # warm-up steps
    fraction_min: float = 1.0  # per step the substituted token fraction is drawn from [min, max];
    fraction_max: float = 1.0  # full substitution trained best (0.5-1 is the PROBES recipe)
    direction: str = "forward"  # KL direction: forward = KL(teacher||model), reverse = KL(model||teacher)
    hidden_weight: float = 1.0  # weight of a relative last-hidden-state matching term (0 = KL only)
    eval_blocks: int = 32  # held-out blocks for the before/after check
    checkpoint_every: int = 100  # steps between resumable checkpoints (0 = none)
    # random: a random fraction of tokens (token level) or assignments (assignment level) is
    # substituted; serving: overflow drawn as at serving time, the runtime's `policy` at a capacity
    # factor drawn per step from [cf_min, cf_max] under `priority`
    overflow: str = "random"
    policy: str = "shadow"  # serving: the policy that decides what the stand-in serves
    priority: str = "score"  # serving: position | score
    cf_min: float = 1.0  # serving: per step the capacity factor is drawn from [cf_min, cf_max]
    cf_max: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.overflow not in ("random", "serving"):
            raise ValueError(f"overflow must be random or serving, got {self.overflow!r}.")
        if not 0 < self.cf_min <= self.cf_max:
            raise ValueError("need 0 < cf_min <= cf_max.")
        if self.steps < 0 or self.blocks <= 0 or self.batch_size <= 0 or self.eval_blocks <= 0:
            raise ValueError("steps must be >= 0 and blocks, batch_size, eval_blocks positive.")
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0 = no checkpoints).")
        if not 0.0 <= self.fraction_min <= self.fraction_max <= 1.0:
            raise ValueError("need 0 <= fraction_min <= fraction_max <= 1.")
        if self.direction not in ("forward", "reverse"):
            raise ValueError(f"direction must be forward or reverse, got {self.direction!r}.")
        if self.lr <= 0 or self.hidden_weight < 0:
            raise ValueError("lr must be positive and hidden_weight non-negative.")


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    """Layer-wise distillation from a capture store, then optional end-to-end (`understudy distill`)."""

    model: str = "runs/teacher"  # the model whose layers the store recorded
    store: str = "runs/store"  # capture store folder
    out: str = (
        "runs/understudies"  # output folder (safetensors + config.json; layerwise/ holds resume markers)
    )
    arch: str = "dense"  # dense | lowrank | merged | small_moe | shadows | trunk
    intermediate: int | None = None  # dense/merged/lowrank/small_moe intermediate (None: the arch default)
    rank: int | None = None  # lowrank bottleneck rank (None: hidden // 8)
    num_experts: int | None = None  # small_moe experts (None: half the layer's)
    top_k: int | None = None  # small_moe top-k (None: the layer's)
    width: int | None = None  # shadows: per-expert intermediate (swiglu) or rank (lowrank), None: I // 4;
    # trunk: shared hidden width, None: I // 2
    kind: str = "swiglu"  # shadows: swiglu | lowrank
    film: bool = True  # trunk: per-expert shifts of the hidden units beside the per-expert scales
    adapter_rank: int = 0  # trunk: rank of a per-expert low-rank linear correction B_e A_e x (0: none)
    # trunk without FiLM or adapters: a row with n served pairs runs min(width, n x this) hidden units,
    # so a served pair costs at most this many units at every cf (0: the whole width always)
    width_per_pair: int = 0
    # trunk: uniform (every expert adapter_rank) | overflow (E x adapter_rank ranks shared out by each
    # expert's overflow mass in the store: score priority at focus_cfs, or 1-2 without them)
    adapter_allocation: str = "uniform"
    adapter_max_rank: int | None = None  # overflow allocation: the largest rank (None: 2 x adapter_rank)
    init: str | None = None  # trunk: merged | union | random (None: merged); shadows: teacher | random
    # auto: assignment-level stand-ins fit per (token, expert) targets from the experts, token-level ones
    # the captured routed output; combined: every arch fits the captured routed output
    objective: str = "auto"
    extra_experts: int = 2  # assignment objective: experts beyond the top-k drawn per token from its router
    # assignment objective: weight routed pairs by how often they overflow under score priority at these
    # capacity factors (over batches of `focus_batch_rows` captured rows); () weighs them by combine weight only
    focus_cfs: tuple[float, ...] = ()
    focus_batch_rows: int = 1024  # the serving batch the focus plans over (8 blocks x 128 tokens)
    # assignment objective: a pair's error counts with its combine weight to this power (2: its share
    # of the layer's output error when served)
    pair_weight_power: float = 1.0
    loss: str = "mse"  # layer-wise loss: mse | cosine | relative
    steps: int = 1500  # layer-wise optimiser steps per layer (upper bound; early stop may end sooner)
    batch_tokens: int = 1024  # captured rows per step
    lr: float = 3e-3  # peak AdamW learning rate (cosine decay)
    weight_decay: float = 0.0
    warmup: int = 50  # warm-up steps
    eval_every: int = 100  # steps between held-out relative-error checks
    patience: int = 5  # stop a layer after this many checks without improvement
    e2e: EndToEndConfig = field(default_factory=EndToEndConfig)  # end-to-end stage (steps 0 = off)
    seed: int = 0
    # the model's dtype in the end-to-end stage and the perplexity checks; understudies keep fp32
    # master weights (the core upcasts their inputs) and are saved in fp32
    dtype: str = "float32"
    device: str = "cpu"  # cpu | cuda | cuda:N | auto

    def __post_init__(self) -> None:
        if self.arch not in ("dense", "lowrank", "merged", "small_moe", "shadows", "trunk"):
            raise ValueError(
                f"arch must be one of dense, lowrank, merged, small_moe, shadows, trunk; got {self.arch!r}."
            )
        _canonical_dtypes(self, "dtype")
        if self.objective not in ("auto", "combined"):
            raise ValueError(f"objective must be auto or combined, got {self.objective!r}.")
        if self.width_per_pair < 0:
            raise ValueError(f"width_per_pair must be >= 0, got {self.width_per_pair}.")
        if self.extra_experts < 0 or self.adapter_rank < 0:
            raise ValueError(
                f"extra_experts and adapter_rank must be >= 0, got {self.extra_experts} and {self.adapter_rank}."
            )
        if not self.pair_weight_power > 0:
            raise ValueError(f"pair_weight_power must be > 0, got {self.pair_weight_power}.")
        if self.adapter_allocation not in ("uniform", "overflow"):
            raise ValueError(
                f"adapter_allocation must be uniform or overflow, got {self.adapter_allocation!r}."
            )
        if self.adapter_max_rank is not None and self.adapter_max_rank < self.adapter_rank:
            raise ValueError(
                f"adapter_max_rank ({self.adapter_max_rank}) must be at least adapter_rank ({self.adapter_rank})."
            )
        if self.loss not in ("mse", "cosine", "relative"):
            raise ValueError(f"loss must be mse, cosine or relative, got {self.loss!r}.")
        if self.steps <= 0 or self.batch_tokens <= 0 or self.eval_every <= 0 or self.patience <= 0:
            raise ValueError("steps, batch_tokens, eval_every and patience must be positive.")
        if self.lr <= 0:
            raise ValueError("lr must be positive.")


@dataclass(frozen=True)
class ReplaceEvalConfig(StageConfig):
    """Perplexity with every MoE layer replaced by its saved understudy (`understudy replace-eval`)."""

    model: str = "runs/teacher"  # the model the understudies were distilled for
    understudies: str = "runs/understudies"  # folder (or hub id) written by `understudy distill`
    data: DataConfig = field(default_factory=DataConfig)  # held-out text (its validation split)
    blocks: int = 32  # held-out blocks scored
    json_out: str | None = None  # the figures as JSON, if wanted
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # the model's dtype (the understudies follow it)

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        if self.blocks <= 0:
            raise ValueError(f"blocks must be positive, got {self.blocks}.")


@dataclass(frozen=True)
class QuantizeConfig(StageConfig):
    """Weight-only int8 storage of saved stand-ins (`understudy quantize`)."""

    model: str = "runs/teacher"  # the model the stand-ins were distilled for
    understudies: str = "runs/understudies"  # folder (or hub id) written by `understudy distill`
    out: str = "runs/understudies-int8"  # new folder for the int8 stand-ins (the float ones are kept)


# ---- runtime ----
CAPACITY_SCOPES = ("expert", "rank")


@dataclass(frozen=True)
class RuntimeConfig(StageConfig):
    """How the load-aware MoE runtime treats overflow (`runtime.patch`)."""

    policy: str = "full"  # one of runtime.policies.POLICIES
    capacity_factor: float = 1.0  # per-expert capacity = ceil(cf * tokens * k / E), per layer and step
    # expert | rank: with rank (expert parallelism only), ceil(cf * tokens * k / ranks) per rank over
    # all its experts, so a cold expert's room absorbs a hot neighbour's overflow
    capacity_scope: str = "expert"
    priority: str = "position"  # which assignments overflow first: position (arrival) | score (lowest weight)
    readmit: bool = True  # understudy: offer capacity freed by understudy tokens back to tokens that fit
    threshold: float | None = (
        None  # layer: max/mean load above which the layer uses its understudy; None = any overflow
    )
    time_per_assignment: float = 1.0  # deadline: time an expert spends per assignment (cost-model units)
    latency: float = 0.0  # deadline: fixed dispatch + combine latency added to every expert result
    deadline: float | None = (
        None  # deadline: results later than this are replaced; None = capacity x time + latency
    )
    expanded_m: int = 1  # expanded_drop / expanded_shadow: local candidates per token beyond its top-k
    # devices tokens and experts live on in one process (tokens in contiguous chunks, experts
    # contiguous): expanded_drop's "local" and the byte / work ledger; expert parallelism uses its ranks
    num_devices: int = 1

    def __post_init__(self) -> None:
        from moe_understudy.runtime.policies import POLICIES, PRIORITIES

        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}.")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}.")
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}.")
        if self.capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope must be expert or rank; got {self.capacity_scope!r}.")
        if self.threshold is not None and self.threshold < 1.0:
            raise ValueError(
                f"threshold is a max/mean load ratio and must be at least 1, got {self.threshold}."
            )
        if self.time_per_assignment <= 0 or self.latency < 0:
            raise ValueError("time_per_assignment must be positive and latency non-negative.")
        if self.expanded_m < 1 or self.num_devices < 1:
            raise ValueError("expanded_m and num_devices must be at least 1.")

    def policy_kwargs(self) -> dict[str, Any]:
        """The policy options `plan_routing` takes."""
        return dict(
            readmit=self.readmit,
            threshold=self.threshold,
            time_per_assignment=self.time_per_assignment,
            latency=self.latency,
            deadline=self.deadline,
        )


def _check_sweep(cfg, policies_may_default: bool = False) -> None:
    """Validate the policy x capacity sweep every evaluation config runs: policies, capacities, priority."""
    from moe_understudy.runtime.policies import POLICIES, PRIORITIES

    unknown = [p for p in cfg.policies if p not in POLICIES]
    if unknown or not (cfg.policies or policies_may_default):
        raise ValueError(
            f"policies must be a non-empty list from {', '.join(POLICIES)}; got {list(cfg.policies)}."
        )
    if not cfg.capacities or any(c <= 0 for c in cfg.capacities):
        raise ValueError(f"capacities must be positive numbers, got {list(cfg.capacities)}.")
    if cfg.priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {cfg.priority!r}.")


@dataclass(frozen=True)
class EvalConfig(StageConfig):
    """Quality under load (`understudy evaluate`): every policy x capacity factor on one scenario."""

    model: str = "runs/teacher"  # saved MoE model folder (teacher) with its tokenizer
    understudies: str | None = (
        None  # folder written by `understudy distill`; needed by understudy/layer/deadline/shadow
    )
    out: str = "runs/eval"  # report folder: report.json, report.png, eval.yaml
    # policies compared side by side; () = full, drop, expanded_drop, reroute, then the policy that serves
    # the understudies' level (shadow for assignment-level stand-ins, understudy for token-level ones)
    policies: tuple[str, ...] = ()
    capacities: tuple[float, ...] = (
        1.0,
        1.25,
        1.5,
        2.0,
    )  # capacity factors swept for every capacity policy (the targets' range)
    priority: str = (
        "score"  # score (Capacity-Aware token drop: lowest router weight overflows first) | position
    )
    scenario: str = "natural"  # natural (held-out text) | domain_shift | hot_expert
    hot_expert: int = 0  # hot_expert: the expert whose router logit is raised (every layer)
    hot_bias: float = 2.0  # hot_expert: logit bias added to that expert
    # natural text: None means the model's own (its cached held-out blocks, its teacher.yaml corpus,
    # else the default corpus with a printed notice); a DataConfig means the user's text
    data: DataConfig | None = None
    max_blocks: int = 64  # evaluation blocks (of data.block_size tokens)
    batch_sizes: tuple[int, ...] = (
        8,
    )  # blocks per forward step; capacity is per step, so this is the batch-size sweep
    num_devices: int = 4  # devices tokens and experts live on: expanded_drop's locality, the byte ledger
    capacity_scope: str = "expert"  # expert | rank (per simulated device; see RuntimeConfig)
    expanded_m: int = 1  # expanded_drop / expanded_shadow: local candidates per token (see RuntimeConfig)
    readmit: bool = True  # understudy policy: refill freed capacity (see RuntimeConfig)
    threshold: float | None = None  # layer policy threshold (see RuntimeConfig)
    latency: float = 0.0  # deadline policy latency in assignment-times (see RuntimeConfig)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # the model's dtype (stand-ins follow it): float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        _check_sweep(self, policies_may_default=True)
        if self.scenario not in ("natural", "domain_shift", "hot_expert"):
            raise ValueError(f"scenario must be natural, domain_shift or hot_expert; got {self.scenario!r}.")
        if self.max_blocks <= 0 or not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("max_blocks and every batch size must be positive.")
        if self.num_devices <= 0:
            raise ValueError(f"num_devices must be positive, got {self.num_devices}.")


# ---- parallel ----
SIM_POLICIES = ("full", "drop", "reroute", "understudy", "replication", "speculative")


@dataclass(frozen=True)
class EPConfig(StageConfig):
    """Evaluation under real expert parallelism (`python -m moe_understudy.runtime.ep`, `evaluate --ep N`)."""

    model: str = "runs/teacher"  # saved MoE model folder with its tokenizer (and cached blocks.pt)
    understudies: str | None = (
        None  # folder written by `understudy distill`; needed by understudy/layer/deadline/shadow
    )
    policies: tuple[str, ...] = (
        "full",
    )  # policies run in one launch (capacity over the GLOBAL batch of all ranks)
    capacities: tuple[float, ...] = (
        1.0,
    )  # capacity factors for every policy but full: ceil(cf * global tokens * k / E)
    priority: str = (
        "score"  # score (Capacity-Aware token drop: lowest router weight overflows first) | position
    )
    capacity_scope: str = "expert"  # expert | rank: capacity per expert, or per rank over all its experts
    placement: str = (
        "contiguous"  # contiguous | replicate (hot experts from measured load) | path to a JSON file
    )
    extra_slots: int = 0  # replicate: expert slots per rank beyond ceil(E / ranks) (the memory budget)
    expanded_m: int = 1  # expanded_drop / expanded_shadow: candidates per token on its own rank
    # replicate: the text EPLB plans on: train (an earlier window: stale) | eval (the served blocks:
    # fresh) | a corpus source (another domain: stale across a shift)
    calibration: str = "train"
    # text to evaluate on and, for placement replicate, to measure load on: None means the model's
    # own (cached blocks, its teacher.yaml corpus, else the default corpus with a notice)
    data: DataConfig | None = None
    max_blocks: int = 64  # evaluation blocks over all ranks (of data.block_size tokens)
    blocks_per_rank: int = 2  # blocks each rank contributes to one step; global batch = ranks x this
    out: str = "runs/ep"  # report folder: ep.json (per rank and step statistics) and ep.yaml
    timeout_s: float = 60.0  # collective timeout: a dead rank makes the others fail after this long
    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    dtype: str = "float32"  # the model's dtype on every rank (stand-ins follow it)

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        _check_sweep(self)
        if self.capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope must be expert or rank; got {self.capacity_scope!r}.")
        if self.extra_slots < 0 or self.max_blocks <= 0 or self.blocks_per_rank <= 0 or self.timeout_s <= 0:
            raise ValueError("extra_slots must be >= 0; max_blocks, blocks_per_rank and timeout_s positive.")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"backend must be auto, gloo or nccl; got {self.backend!r}.")


@dataclass(frozen=True)
class ClusterCost(StageConfig):
    """Cost model of one MoE layer step on a GPU cluster (sim/cost.py); each default's source is on its line.

    Defaults: a DeepSeek-V3-sized routed expert on H800/H200-class GPUs, 8 GPUs per node, with the
    all-to-all bandwidths DeepEP's README reports (docs/legacy.md, "Performance"; H800 + CX7 400 Gb/s).
    """

    hidden_size: int = 7168  # DeepSeek-V3 config.json hidden_size; one row on the wire = H x dtype_bytes
    expert_intermediate: int = 2048  # DeepSeek-V3 moe_intermediate_size; FLOPs per assignment = 6 H I
    dtype_bytes: int = 2  # bf16 rows both ways, as the ledger charges (DeepEP's tests dispatch FP8: 1 byte)
    # bf16 grouped-GEMM TFLOP/s per GPU: 989 dense bf16 peak on H100/H800/H200 SXM (NVIDIA datasheets)
    # x ~0.6, the fraction of the FP8 peak DeepGEMM's README (commit 327ec92) reports for DeepSeek-V3
    # expert shapes on H800 (815-1346 of 1979 TFLOP/s, grouped contiguous and masked layouts)
    device_tflops: float = 600.0
    # internode RDMA GB/s per GPU: DeepEP 43-58 (normal kernels, EP16-64), 39-48 (low-latency, EP32-256)
    link_gbps: float = 45.0
    nvlink_gbps: float = 150.0  # intranode NVLink GB/s per GPU: DeepEP 153 / 158 (dispatch / combine, EP8)
    ranks_per_node: int = 8  # GPUs per node sharing NVLink (DeepEP's EP 8 x nodes)
    # per all-to-all (and exchange all-gather) message: an assumption, not a measurement. DeepEP's
    # low-latency table is explained by bytes / bandwidth to within a few us (EP8: 128 tokens x 8 x
    # 7392 B FP8 rows = 7.6 MB at 98 GB/s = 77 us, reported 77 us)
    latency_us: float = 5.0
    understudy_cost: float = 0.5  # token-level understudy FLOPs / active routed experts' (SimConfig)

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.expert_intermediate, self.dtype_bytes, self.ranks_per_node) <= 0:
            raise ValueError(
                "hidden_size, expert_intermediate, dtype_bytes and ranks_per_node must be positive."
            )
        if self.device_tflops <= 0 or self.link_gbps <= 0 or self.nvlink_gbps <= 0 or self.latency_us < 0:
            raise ValueError(
                "device_tflops, link_gbps and nvlink_gbps must be positive, latency_us non-negative."
            )
        if self.understudy_cost <= 0:
            raise ValueError(f"understudy_cost must be positive, got {self.understudy_cost}.")


@dataclass(frozen=True)
class SimConfig(StageConfig):
    """Trace-driven cluster simulation (`understudy simulate`)."""

    model: str | None = None  # capture the trace from this saved MoE model (its cached blocks or data)
    trace: str | None = None  # ... or replay a saved trace (.safetensors); neither: synthetic Zipf trace
    zipf: float = 1.0  # synthetic trace: Zipf exponent of expert popularity (0 = uniform)
    synthetic_experts: int = 8  # synthetic trace: experts per layer
    synthetic_layers: int = 4  # synthetic trace: MoE layers
    top_k: int = 2  # synthetic trace: experts per token
    # text the trace is captured on: None means the model's own (cached blocks, its teacher.yaml
    # corpus, else the default corpus with a notice)
    data: DataConfig | None = None
    max_blocks: int = 64  # blocks captured from the model
    device: str = "cpu"  # where the model runs while its trace is captured
    dtype: str = "float32"  # the model's dtype while its trace is captured
    ranks: tuple[int, ...] = (
        8,
        16,
        32,
        64,
        128,
        256,
    )  # cluster sizes; experts expand by tiling when ranks > E
    policies: tuple[str, ...] = SIM_POLICIES  # compared side by side
    capacity_factor: float = 1.0  # capacity of drop / reroute / understudy
    priority: str = "score"  # score (Capacity-Aware token drop, the literature's baseline) | position
    tokens_per_rank: int = 512  # tokens each rank holds per step (weak scaling)
    expansion: str = "random"  # ranks > experts: siblings drawn per assignment (random: keeps the skew) | per token id (token)
    steps: int = 3  # simulated steps per cluster size (fresh token sample each)
    calibration_fraction: float = 0.5  # part of the trace used to plan replication and fit speculation
    cost: ClusterCost = field(default_factory=ClusterCost)
    quality: str = "benchmarks/results/quality_under_load.json"  # measured quality per policy, if present
    out: str = "runs/sim"  # sim.json, sim.png, sim.yaml, trace.safetensors
    seed: int = 0

    def __post_init__(self) -> None:
        from moe_understudy.runtime.policies import PRIORITIES

        _canonical_dtypes(self, "dtype")
        bad = [p for p in self.policies if p not in SIM_POLICIES]
        if bad or not self.policies:
            raise ValueError(
                f"policies must be a non-empty list from {', '.join(SIM_POLICIES)}; got {list(self.policies)}."
            )
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {list(self.ranks)}.")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}.")
        if self.capacity_factor <= 0 or self.tokens_per_rank <= 0 or self.steps <= 0:
            raise ValueError("capacity_factor, tokens_per_rank and steps must be positive.")
        if self.expansion not in ("random", "token"):
            raise ValueError(f"expansion must be random or token, got {self.expansion!r}.")
        if not 0.0 < self.calibration_fraction < 1.0:
            raise ValueError(f"calibration_fraction must be in (0, 1), got {self.calibration_fraction}.")
        if self.zipf < 0 or self.synthetic_experts < 2 or not 1 <= self.top_k < self.synthetic_experts:
            raise ValueError("zipf must be >= 0, synthetic_experts >= 2 and 1 <= top_k < synthetic_experts.")


# Systems compared side by side by the shifting-load study (sim/study.py); see sim/systems.py.
SHIFT_SYSTEMS = (
    "full",
    "drop",
    "expanded_drop",
    "eplb_fresh",
    "eplb_stale",
    "eplb_stale_standin",
    "standin",
)
SHIFT_SCENARIOS = ("natural", "domain_shift", "hot_burst")


@dataclass(frozen=True)
class ShiftSimConfig(StageConfig):
    """EPLB against stand-ins under shifting load, replayed step by step (`benchmarks/sim_eplb.py`)."""

    model: str = "runs/teacher-fine"  # teacher whose captured routing is replayed
    stand_in: str | None = None  # saved stand-in folder: its memory and FLOPs are read; None: the two below
    stand_in_memory: float = 1.0  # stand-in per device per layer, in routed experts (memory_expert_equiv)
    stand_in_flops: float = 0.5  # stand-in FLOPs per served assignment / one routed expert's
    ranks: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    scenarios: tuple[str, ...] = SHIFT_SCENARIOS
    systems: tuple[str, ...] = SHIFT_SYSTEMS
    phase: str = "decode"  # decode: each rank's sequences emit one token per step | prefill: whole blocks
    tokens_per_rank: int = 128  # tokens each rank's attention (data parallel) feeds the MoE per step
    # decode: tokens of one sequence (a window of a captured block). Time is compressed: about 60x
    # against sequences of ~1000 tokens, so vLLM's defaults (window_size 1000, step_interval 3000
    # steps) become a window of 16 and a refresh every 48 steps here
    sequence_tokens: int = 16
    steps: int = 64  # timed steps per (scenario, ranks)
    rank_step_budget: int = 4096  # > 0: charge only every k-th step so that ranks x charged steps <= this
    cycle_layers: bool = True  # a charged step charges one MoE layer, the next one each time (else all)
    warmup_steps: int = 16  # steps before the first timed one; their load plans the first stale EPLB
    refresh_every: int = 48  # stale EPLB re-plans every N steps from the last `window` steps' load
    window: int = 16  # steps of load a stale plan is made from
    fresh_window: int = 8  # EPLB fresh is re-planned every N steps on the mean load of those very steps
    shift_at: float = 0.25  # domain_shift: new sequences are prose after this fraction of the steps
    burst_every: int = 16  # hot_burst: a burst starts every N steps ...
    burst_len: int = 4  # ... and lasts this many steps
    burst_bias: float = 2.0  # ... with this router-logit bias on one expert per layer (drawn per burst)
    capacity_factor: float = 1.0  # per rank: ceil(cf * tokens * k / ranks)
    priority: str = "score"  # which assignments overflow first: score | position
    memory_budget: int = 1  # per device per layer beyond E / R, in routed experts (EPLB's extra slots)
    expansion: str = "fitted"  # ranks > experts: fitted (sibling shares + context, fitted) | random siblings
    max_blocks: int = 512  # natural (and prose) blocks captured
    cost: ClusterCost = field(default_factory=ClusterCost)
    out: str = "runs/sim_eplb"
    seed: int = 0

    def __post_init__(self) -> None:
        from moe_understudy.runtime.policies import PRIORITIES

        bad = [s for s in self.systems if s.split("@")[0] not in SHIFT_SYSTEMS]
        if bad or not self.systems:
            raise ValueError(
                f"systems must be a non-empty list from {', '.join(SHIFT_SYSTEMS)}; got {list(self.systems)}."
            )
        bad = [s for s in self.scenarios if s not in SHIFT_SCENARIOS]
        if bad or not self.scenarios:
            raise ValueError(
                f"scenarios must be a non-empty list from {', '.join(SHIFT_SCENARIOS)}; got {list(self.scenarios)}."
            )
        if not self.ranks or any(r < 2 for r in self.ranks):
            raise ValueError(f"ranks must be integers >= 2, got {list(self.ranks)}.")
        if self.phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be decode or prefill, got {self.phase!r}.")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {self.priority!r}.")
        if (
            min(self.tokens_per_rank, self.sequence_tokens, self.steps, self.refresh_every, self.window) <= 0
            or min(self.fresh_window, self.max_blocks) <= 0
            or self.rank_step_budget < 0
        ):
            raise ValueError(
                "tokens_per_rank, sequence_tokens, steps, refresh_every, window, fresh_window and max_blocks "
                "must be positive, rank_step_budget >= 0."
            )
        if self.warmup_steps < self.window:
            raise ValueError(
                "warmup_steps must be at least window (the first stale plan needs a full window)."
            )
        if not 0.0 <= self.shift_at < 1.0 or self.burst_len <= 0 or self.burst_every <= self.burst_len:
            raise ValueError("need 0 <= shift_at < 1 and 0 < burst_len < burst_every.")
        if self.capacity_factor <= 0 or self.memory_budget < 0:
            raise ValueError("capacity_factor must be positive and memory_budget >= 0.")
        if self.stand_in_memory <= 0 or self.stand_in_flops <= 0:
            raise ValueError("stand_in_memory and stand_in_flops must be positive.")
        if self.expansion not in ("fitted", "random"):
            raise ValueError(f"expansion must be fitted or random, got {self.expansion!r}.")


# ---- demo ----
@dataclass(frozen=True)
class DemoConfig(StageConfig):
    """The whole pipeline on the embedded default (`understudy demo`): teacher -> capture -> distil -> evaluate."""

    out: str = "runs/demo"  # run folder: teacher/, store/, understudies/, eval/ (each stage reused when done)
    teacher: str | None = None  # an existing teacher folder to use instead of training runs/demo/teacher
    teacher_steps: int = (
        1000  # the demo's teacher: the default preset, fewer steps than `understudy teacher`'s 1400
    )
    quick: bool = False  # seconds-long smoke run on the quick preset (tests)
    arch: str = "trunk"  # stand-in architecture (trunk: the bounded-memory assignment-level stand-in)
    intermediate: int | None = None  # token-level archs: intermediate size (None: one expert's)
    width: int | None = None  # trunk / shadows width (None: the arch default)
    capture_tokens: int = 65_536  # captured training tokens for layer-wise distillation
    distill_steps: int = 600  # layer-wise steps per layer (early stop may end sooner)
    e2e_steps: int = 0  # end-to-end KL steps after the layer-wise stage (0 = skip)
    # the strongest baselines (Capacity-Aware token drop and expanded drop) beside the stand-in
    policies: tuple[str, ...] = ("full", "drop", "expanded_drop", "shadow")
    capacities: tuple[float, ...] = (1.0, 1.5, 2.0)  # capacity factors swept
    priority: str = "score"  # score (the literature's token drop) | position
    devices: int = 4  # devices tokens and experts live on: expanded_drop's locality and the byte ledger
    eval_blocks: int = 64  # held-out blocks of 128 tokens for the evaluation
    # every stage's: the teacher trains (fp32 weights under autocast), captures, distils and is evaluated
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"  # float32 | bfloat16 | float16

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        if (
            min(self.teacher_steps, self.capture_tokens, self.distill_steps, self.eval_blocks) <= 0
            or self.e2e_steps < 0
        ):
            raise ValueError(
                "teacher_steps, capture_tokens, distill_steps and eval_blocks must be positive; e2e_steps >= 0."
            )
        if not self.capacities or any(c <= 0 for c in self.capacities):
            raise ValueError("capacities must be positive capacity factors.")


# ---- serving ----
SERVE_MODES = ("decode", "prefill")


@dataclass(frozen=True)
class ServeConfig(StageConfig):
    """Generation under load (`understudy serve-eval`): continuous-batched greedy decoding per policy x capacity."""

    model: str = "runs/teacher"  # saved MoE model folder (teacher) with its tokenizer
    understudies: str | None = (
        None  # stand-in folder from `understudy distill`, for the policies that need one
    )
    out: str = "runs/serve"  # report folder: report.json, report.png, serve.yaml
    policies: tuple[str, ...] = ("full", "drop", "expanded_drop")  # systems compared, `full` first
    capacities: tuple[float, ...] = (1.0, 1.5, 2.0)  # capacity factors; capacity is per step over its tokens
    priority: str = "score"  # which assignments overflow first: score (lowest router weight) | position
    data: str = (
        "heldout"  # prompts: heldout (the model's held-out blocks) | domain_shift | an instruction file
    )
    fmt: str = "auto"  # instruction format of a `data` file (see data/instructions.py)
    prompts: int = 64  # prompts served (N)
    prompt_tokens: int = 64  # held-out blocks cut to this many tokens; instruction prompts cut from the left
    new_tokens: int = 32  # greedy tokens generated per prompt (fewer at end-of-text)
    slots: int | None = None  # sequences decoding at once (None: all N); freed slots go to waiting prompts
    mode: str = "decode"  # decode: decode steps under the policy | prefill: prompt chunks under the policy
    prefill_chunk: int | None = None  # prefill positions per forward call (None: whole prompts)
    num_devices: int = 4  # devices the experts are spread over (contiguously) for all-to-all bytes
    noise_floor: bool = True  # decode: also run the unpatched model with another batch composition
    bf16_floor: bool = True  # ... and in bfloat16
    device: str = "cpu"
    dtype: str = "float32"  # the model's dtype: float32 | bfloat16 | float16 (stand-ins follow it)

    def __post_init__(self) -> None:
        _canonical_dtypes(self, "dtype")
        _check_sweep(self)
        if self.prompts < 1:
            raise ValueError(f"serve-eval needs at least one prompt; got prompts = {self.prompts}.")
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ValueError("prompt_tokens and new_tokens must be at least 1.")
        if self.mode == "decode" and self.new_tokens < 2:
            raise ValueError(
                "decode mode scores decode steps, which start at the second new token: new_tokens >= 2."
            )
        if (self.slots is not None and self.slots < 1) or (
            self.prefill_chunk is not None and self.prefill_chunk < 1
        ):
            raise ValueError("slots and prefill_chunk must be at least 1 when given.")
        if self.mode not in SERVE_MODES:
            raise ValueError(f"mode must be decode or prefill; got {self.mode!r}.")
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be positive, got {self.num_devices}.")
