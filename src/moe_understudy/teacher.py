"""Train a small MoE teacher from scratch (`understudy teacher`), with checkpoints and resume.

Run folder layout (`out_dir`):
  teacher.yaml           the TeacherConfig of the run
  tokenizer files        BPE trained on the corpus (or the tokenizer given), transformers format
  blocks.pt              packed train/val token blocks, so a resumed run sees identical data
  checkpoint/            last periodic checkpoint: model.safetensors + state.pt (optimiser, step, RNG),
                         written from CPU copies, so a run resumes on another --device
  at-STEP/               with `save_at`: the `save_pretrained` model + tokenizer when step STEP completed,
                         and its metrics.json (held-out perplexity then); written once, kept on resume
  config.json, model.safetensors   the final `save_pretrained` model (written at the end)
  metrics.json           held-out perplexity, tokens/s, expert-load imbalance, timings

`--device` / `--dtype` (precision.py): the model, its optimiser state and each batch live on the
device; the weights stay fp32 and every forward (training steps, held-out perplexity, the expert
load) runs under autocast to the dtype, float16 with dynamic loss scaling. The saved model is fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn

from moe_understudy.config import TeacherConfig
from moe_understudy.data import get_tokenizer, load_corpus, pack_blocks
from moe_understudy.errors import UserError
from moe_understudy.eval.metrics import perplexity
from moe_understudy.files import atomic_torch_save
from moe_understudy.inspect_routing import routing_load
from moe_understudy.moe.loading import CHECKPOINT_DIR
from moe_understudy.moe.presets import build_model, preset_config
from moe_understudy.precision import MixedPrecision, on_cpu, step_with_scaler
from moe_understudy.progress import stage_bar
from moe_understudy.schedule import warmup_cosine

SNAPSHOT_PREFIX = "at-"


def snapshot_dir(out_dir: str | Path, step: int) -> Path:
    """Where the `save_at` snapshot of step `step` lives: OUT/at-STEP/."""
    return Path(out_dir) / f"{SNAPSHOT_PREFIX}{step}"


@dataclass(frozen=True)
class TeacherResult:
    out_dir: Path
    val_perplexity: float
    tokens_per_second: float
    max_over_mean_per_batch: list[float]
    train_seconds: float
    steps: int


def batch_indices(step: int, num_blocks: int, batch_size: int, seed: int) -> torch.Tensor:
    """Block ids of training step `step`: epoch-wise permutations, a pure function of (step, seed)."""
    per_epoch = max(1, num_blocks // batch_size)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[offset * batch_size : (offset + 1) * batch_size]


def _prepare_data(cfg: TeacherConfig, out_dir: Path, console: Console):
    """Tokenizer and packed blocks, reused from `out_dir` when a previous run made them."""
    cache = out_dir / "blocks.pt"
    if cache.exists() and (out_dir / "tokenizer.json").exists():
        from moe_understudy.data import load_tokenizer

        saved = torch.load(cache)
        return load_tokenizer(out_dir), saved["train"], saved["val"]
    with console.status("reading corpus"):
        corpus = load_corpus(cfg.data)
    with console.status(
        f"training BPE tokenizer (vocab {cfg.data.vocab_size})"
        if not cfg.data.tokenizer
        else "loading tokenizer"
    ):
        tokenizer = get_tokenizer(cfg.data, corpus.train, out_dir)
    with console.status("tokenising and packing"):
        train = pack_blocks(corpus.train, tokenizer, cfg.data.block_size)
        val = pack_blocks(
            corpus.val, tokenizer, cfg.data.block_size, max_blocks=cfg.eval_batches * cfg.batch_size
        )
    atomic_torch_save({"train": train, "val": val}, cache)
    console.print(
        f"corpus [bold]{corpus.name}[/]: {len(corpus.train)} train / {len(corpus.val)} val documents, "
        f"{train.numel():,} train tokens, {val.numel():,} val tokens"
    )
    return tokenizer, train, val


def _save_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict, out_dir: Path
) -> None:
    """Write checkpoint/ atomically: a crash mid-write leaves the previous checkpoint intact."""
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    # Tied embeddings share storage; safetensors refuses shared tensors, so the copy above splits them.
    save_file(state, str(tmp / "model.safetensors"))
    torch.save(
        {"optimizer": on_cpu(optimizer.state_dict()), "step": step, "rng": torch.get_rng_state(), **extra},
        tmp / "state.pt",
    )
    old = out_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def _load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path) -> tuple[int, dict]:
    ckpt = out_dir / CHECKPOINT_DIR
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])  # moves the state onto the parameters' device
    torch.set_rng_state(state["rng"])
    return int(state["step"]), state


def _save_snapshot(
    model: nn.Module, tokenizer, step: int, metrics: dict, out_dir: Path, console: Console
) -> None:
    """OUT/at-STEP/: model and tokenizer (`save_pretrained`) + metrics.json, renamed into place when complete."""
    final = snapshot_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():  # left by a crash mid-write
        for f in tmp.iterdir():
            f.unlink()
    model.save_pretrained(tmp)
    _save_run_tokenizer(tokenizer, tmp, out_dir)
    (tmp / "metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
    os.replace(tmp, final)
    console.log(f"step {step}: snapshot saved to {final}")


def _save_run_tokenizer(tokenizer, dest: Path, out_dir: Path) -> None:
    """`tokenizer.save_pretrained(dest)`, each file then replaced by the run folder's copy where it has one.

    A tokenizer reloaded on resume saves a slightly different tokenizer_config.json; copying keeps
    every snapshot's tokenizer files byte-identical to the run's.
    """
    for saved in tokenizer.save_pretrained(str(dest)):
        source = out_dir / Path(saved).name
        if source.is_file():
            shutil.copyfile(source, saved)


def _check_resume_config(cfg: TeacherConfig, out_dir: Path) -> None:
    saved = TeacherConfig.from_yaml(out_dir / "teacher.yaml")
    # steps, eval_every and save_at change what is written and when, device where it runs, not the
    # training itself (the checkpoint holds CPU copies).
    same = saved.replace(steps=cfg.steps, eval_every=cfg.eval_every, save_at=cfg.save_at, device=cfg.device)
    if same != cfg:
        raise UserError(
            f"{out_dir} holds a run with a different configuration; resume with the same options "
            f"(see {out_dir / 'teacher.yaml'}) or choose a new --out."
        )


def train_teacher(
    cfg: TeacherConfig, out_dir: str | Path, resume: bool = False, console: Console | None = None
) -> TeacherResult:
    """Train the teacher described by `cfg` into `out_dir`; with `resume`, continue from its checkpoint."""
    console = console or Console(stderr=True)
    precision = MixedPrecision.of(cfg.device, cfg.dtype)  # an unknown device: one sentence, before any work
    out_dir = Path(out_dir)
    has_ckpt = (out_dir / CHECKPOINT_DIR / "state.pt").exists()
    if resume and has_ckpt:
        _check_resume_config(cfg, out_dir)
    elif (out_dir / "config.json").exists() or has_ckpt:
        if not resume:
            raise UserError(
                f"{out_dir} already holds a teacher; pass --resume to continue it or choose a new --out."
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out_dir / "teacher.yaml")
    torch.manual_seed(cfg.seed)

    tokenizer, train_blocks, val_blocks = _prepare_data(cfg, out_dir, console)
    config = preset_config(cfg.preset, vocab_size=len(tokenizer), max_positions=cfg.data.block_size)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = build_model(config, seed=cfg.seed).train()
    if cfg.init_from:
        _load_initial_weights(model, cfg.init_from)
    joint = _joint_understudies(model, cfg)
    model.to(precision.device)  # fp32 master weights; the forwards run under precision.autocast()
    if joint is not None:
        joint.to(precision.device)
    serving = _InLoopOverflow(model, joint, cfg) if cfg.joint_in_loop_from is not None else None
    params = list(model.parameters()) + ([] if joint is None else list(joint.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scaler = precision.scaler()
    groups = [list(model.parameters())] + ([] if joint is None else [list(joint.parameters())])

    start, elapsed = 0, 0.0
    if resume and has_ckpt:
        start, state = _load_checkpoint(model, optimizer, out_dir)
        elapsed = float(state.get("elapsed", 0.0))
        if joint is not None and "joint" in state:
            joint.load_state_dict(state["joint"])
        if serving is not None and "in_loop_rng" in state:
            serving.gen.set_state(state["in_loop_rng"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        precision.set_rng_state(state)
        console.print(f"resuming from step {start} ({out_dir / CHECKPOINT_DIR})")
        missed = [
            s for s in cfg.save_at if s <= start and not (snapshot_dir(out_dir, s) / "config.json").exists()
        ]
        if missed:
            console.print(
                f"[yellow]save_at steps {', '.join(map(str, missed))} passed before this checkpoint; no snapshot for them.[/]"
            )

    tokens_per_step = cfg.batch_size * cfg.data.block_size
    val_ppl = float("nan")
    progress = stage_bar(
        "[bold]teacher[/]",
        "loss {task.fields[loss]:.3f}  val ppl {task.fields[ppl]:.1f}  {task.fields[tps]:,.0f} tok/s",
        console=console,
    )
    with progress:
        task = progress.add_task(
            "train", total=cfg.steps, completed=start, loss=float("nan"), ppl=val_ppl, tps=0.0
        )
        t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, cfg.steps, cfg.lr, cfg.warmup)
            ids = train_blocks[batch_indices(step, len(train_blocks), cfg.batch_size, cfg.seed)]
            ids = ids.to(precision.device)  # CPU indices into the CPU blocks, then the batch moves
            handle = serving.patch(step) if serving is not None else None
            with precision.autocast():
                out = model(input_ids=ids, labels=ids)
                loss = out.loss
                if joint is not None:
                    loss = loss + cfg.joint_weight * joint.loss()
            if not torch.isfinite(loss):
                raise UserError(
                    f"Training loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr}) and rerun with "
                    f"--resume to continue from the last checkpoint in {out_dir / CHECKPOINT_DIR}."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if handle is not None:
                handle.unpatch()  # checkpoints, snapshots and held-out checks see the plain model
            # Clipped apart: the joint understudies' gradients must not rescale the teacher's.
            step_with_scaler(scaler, optimizer, cfg.grad_clip, *groups)
            done = step + 1
            run_time = elapsed + time.perf_counter() - t0
            tps = (done - start) * tokens_per_step / max(1e-9, time.perf_counter() - t0)
            evaluated = done % cfg.eval_every == 0 or done == cfg.steps
            if evaluated:
                with precision.autocast():
                    val_ppl = perplexity(model, val_blocks, cfg.batch_size)
                extra = {"elapsed": run_time, "val_ppl": val_ppl, **precision.rng_state()}
                if scaler.is_enabled():
                    extra["scaler"] = scaler.state_dict()
                if joint is not None:
                    extra["joint"] = on_cpu(joint.state_dict())
                if serving is not None:
                    extra["in_loop_rng"] = serving.gen.get_state()
                _save_checkpoint(model, optimizer, done, extra, out_dir)
                progress.console.log(
                    f"step {done}/{cfg.steps}: loss {out.loss.item():.3f}, held-out perplexity {val_ppl:.2f}, checkpoint saved"
                )
            if done in cfg.save_at and not (snapshot_dir(out_dir, done) / "config.json").exists():
                snap_ppl = val_ppl
                if not evaluated:
                    with precision.autocast():
                        snap_ppl = perplexity(model, val_blocks, cfg.batch_size)
                snap_metrics = {
                    "val_perplexity": round(snap_ppl, 3),
                    "train_tokens": done * tokens_per_step,
                    "train_seconds": round(run_time, 1),
                }
                _save_snapshot(model, tokenizer, done, snap_metrics, out_dir, progress.console)
            progress.update(task, completed=done, loss=out.loss.item(), ppl=val_ppl, tps=tps)
    train_seconds = elapsed + time.perf_counter() - t0

    model.eval()
    model.save_pretrained(out_dir)
    if not (out_dir / "tokenizer_config.json").exists():  # the run's files, written when data was prepared
        tokenizer.save_pretrained(out_dir)
    if joint is not None:
        joint.save(out_dir / "understudies")
    with console.status("measuring expert load on held-out text"), torch.no_grad(), precision.autocast():
        load = routing_load(model, val_blocks, batch_size=8)
        final_ppl = perplexity(model, val_blocks, cfg.batch_size)
    trained_tokens = (cfg.steps - start) * tokens_per_step
    result = TeacherResult(
        out_dir=out_dir,
        val_perplexity=final_ppl,
        tokens_per_second=trained_tokens / max(1e-9, train_seconds - elapsed),
        max_over_mean_per_batch=[round(v, 3) for v in load.mean_batch_ratio().tolist()],
        train_seconds=train_seconds,
        steps=cfg.steps,
    )
    metrics = {
        "val_perplexity": round(result.val_perplexity, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_seconds": round(train_seconds, 1),
        "train_tokens": cfg.steps * tokens_per_step,
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_load": load.to_dict(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(precision.device),
        "dtype": precision.name,
        "data_sha256": data_fingerprint(train_blocks, val_blocks),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return result


def data_fingerprint(*blocks: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of the packed token blocks: two teachers with equal
    fingerprints saw the same tokens (the `python` corpus, for one, depends on what is installed)."""
    digest = hashlib.sha256()
    for b in blocks:
        digest.update(b.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _load_initial_weights(model: nn.Module, folder: str) -> None:
    """Start from a saved model of the same preset (a continued training phase)."""
    from transformers import AutoModelForCausalLM

    try:
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except OSError as err:
        raise UserError(f"--init-from {folder} is not a saved model folder; pass a teacher folder.") from err
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise UserError(
            f"--init-from {folder} holds another architecture than preset {model.config.model_type!r}; "
            f"pass a model trained with the same --preset."
        )


class _InLoopOverflow:
    """From `joint_in_loop_from` on, each step's forward serves its overflow with the joint stand-ins."""

    def __init__(self, model: nn.Module, joint, cfg: TeacherConfig) -> None:
        self.model, self.joint, self.cfg = model, joint, cfg
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)

    def patch(self, step: int):
        """The patched model's handle for this step (unpatch it after the backward), or None before."""
        from moe_understudy.runtime.layer import patch

        c = self.cfg
        cf = c.joint_cf_min + (c.joint_cf_max - c.joint_cf_min) * torch.rand((), generator=self.gen).item()
        if step < c.joint_in_loop_from:
            return None
        return patch(
            self.model, self.joint.understudies, policy=c.joint_policy, capacity_factor=cf, priority="score"
        )


def _joint_understudies(model: nn.Module, cfg: TeacherConfig):
    """Understudies trained alongside the teacher on a detached auxiliary loss, when asked for."""
    if cfg.joint_understudy is None:
        return None
    from moe_understudy.understudy.joint import JointUnderstudies

    return JointUnderstudies(model, arch=cfg.joint_understudy).attach()
