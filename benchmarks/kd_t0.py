"""Whole-model MoE distillation on the T0 mix, EEM Table 1 in miniature: ROUGE-L on seen / unseen templates.

Pipeline (all stages resumable; intermediate models under --out-dir, default runs/kd_t0/; results committed here):
1. T0 mix from ../shared/data, prompts <= 400 characters and responses <= 16 words; templates split
   seen / unseen (25% of templates held out); train / val / seen-test drawn from seen templates.
2. BPE tokenizer trained on the training examples (data.tokenizer.train_bpe).
3. Teacher: `mixtral` preset MoE (8 experts, top-2) SFT-ed from scratch on the instruction data.
4. Students SFT-ed from scratch: dense --student (default `quick-student`) and MoE --moe-student
   (default `quick-moe-student`, for B-Distill), --student-steps each.
5. From the dense student's SFT checkpoint: KD, GKD, ALL, KA, SAR for --kd-steps each;
   B-Distill from the MoE student's checkpoint. "student SFT" continues SFT for those same steps,
   so every student row has seen the same number of optimiser steps.
6. ROUGE-L F1 x100 by sampling (temperature 1, top-p 1, top-k 0) over seeds 10..50, on the first
   --test-examples of the 100 held-out examples per split.

Run: .venv/bin/python benchmarks/kd_t0.py [--fast]   (--fast: a much shorter smoke run)
Defaults reproduce the first (too small) run: quick-student, 250 teacher / 150 student SFT steps, 50 KD steps,
4000 training examples, 100 test examples per split. A bigger budget goes in its own folder, e.g.
  .venv/bin/python benchmarks/kd_t0.py --student llama-student --student-steps 400 --kd-steps 60 \
      --out-dir runs/kd_t0_llama --reuse-teacher runs/kd_t0
(--reuse-teacher copies the data split, tokenizer and trained teacher of an earlier run made with the same
data settings, so the teacher is not retrained.)
The committed results (about 53 minutes on 2 cores) come from a teacher 4x the student's active size:
  .venv/bin/python benchmarks/kd_t0.py --teacher mixtral-large --teacher-steps 1500 --train 14000 --val 64 \
      --test-examples 200 --student llama-student --student-steps 800 --moe-student moe-student \
      --kd-steps 300 --out-dir runs/kd_t0_large
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS, write_result  # noqa: E402

from moe_understudy.config import KDConfig, SFTConfig  # noqa: E402
from moe_understudy.data import load_instructions, split_by_task, train_bpe  # noqa: E402
from moe_understudy.data.instructions import Example  # noqa: E402
from moe_understudy.eval.rouge import rouge_over_seeds  # noqa: E402
from moe_understudy.kd.sft import run_sft  # noqa: E402
from moe_understudy.kd.trainer import run_kd  # noqa: E402
from moe_understudy.teacher import load_model_and_tokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "t0_mix.jsonl.gz"
NAME = "kd_t0"
SEEDS = (10, 20, 30, 40, 50)
KD_METHODS = ("kd", "gkd", "all", "ka", "sar")
SPLITS = ("test_seen", "test_unseen")
LEARNED_FLOOR = 5.0  # ROUGE-L below which no row has learned the tasks (label tasks score 0 or 100)
# Sampled over SEEDS (the EEM/MiniLLM protocol) and greedy (one decode; far less noisy for small models).
COLUMNS = (*SPLITS, *(f"{k}_greedy" for k in SPLITS))
LABELS = {
    "test_seen": "seen",
    "test_unseen": "unseen",
    "test_seen_greedy": "seen, greedy",
    "test_unseen_greedy": "unseen, greedy",
}
MAX_PROMPT_CHARS = 400  # short prompts keep the whole table within about an hour of shared CPU


TEST_POOL = 100  # held-out examples written per split (more if --test-examples asks for more)


def settings(fast: bool, args: argparse.Namespace | None = None) -> dict:
    """Budget of the run: the historical defaults, --fast's smoke budget, then any flag given explicitly."""
    s = dict(
        train=4000,
        val=32,
        test=TEST_POOL,
        vocab=2048,
        max_prompt=192,
        max_total=256,
        gen=24,
        eval_new=24,
        teacher_steps=250,
        student_steps=150,
        kd_steps=50,
        sft_bs=16,
        kd_bs=16,
        kd_lr=3e-4,
        teacher="mixtral",
        student="quick-student",
        moe_student="quick-moe-student",
    )
    if fast:
        s.update(train=400, val=8, test=16, teacher_steps=20, student_steps=20, kd_steps=6)
    if args is not None:
        flags = dict(
            train=args.train,
            val=args.val,
            test=args.test_examples,
            teacher=args.teacher,
            teacher_steps=args.teacher_steps,
            student_steps=args.student_steps,
            kd_steps=args.kd_steps,
            student=args.student,
            moe_student=args.moe_student,
        )
        s.update({k: v for k, v in flags.items() if v is not None})
    return s


def write_jsonl(path: Path, examples: list[Example]) -> None:
    path.write_text(
        "".join(
            json.dumps({"task": e.task, "prompt": e.prompt, "response": e.response}) + "\n" for e in examples
        )
    )


def prepare_data(run: Path, s: dict) -> dict[str, Path]:
    """Filter, split by template, write train/val/test files; returns their paths."""
    files = {k: run / f"{k}.jsonl" for k in ("train", "val", "test_seen", "test_unseen")}
    if all(p.exists() for p in files.values()):
        return files
    examples = load_instructions(DATA)
    short = [e for e in examples if len(e.prompt) <= MAX_PROMPT_CHARS and 0 < len(e.response.split()) <= 16]
    seen, unseen = split_by_task(short, unseen_fraction=0.25, seed=0)
    random.Random(0).shuffle(seen)
    random.Random(1).shuffle(unseen)
    t, v = max(s["test"], TEST_POOL), s["val"]
    parts = {
        "test_seen": seen[:t],
        "val": seen[t : t + v],
        "train": seen[t + v : t + v + s["train"]],
        "test_unseen": unseen[:t],
    }
    if len(parts["train"]) < s["train"]:
        raise SystemExit(
            f"Only {len(parts['train'])} training examples remain after the test and validation split; "
            f"pass --train {len(parts['train'])} or fewer."
        )
    for k, ex in parts.items():
        write_jsonl(files[k], ex)
    return files


def reuse_teacher(src: Path, run: Path, s: dict) -> None:
    """Copy data split, tokenizer and teacher SFT from an earlier run, refusing one made with other settings."""
    import shutil

    import yaml

    cfg = yaml.safe_load((src / "teacher_sft" / "sft.yaml").read_text())
    n_train = sum(1 for _ in open(src / "train.jsonl"))
    n_val = sum(1 for _ in open(src / "val.jsonl"))
    n_test = sum(1 for _ in open(src / "test_seen.jsonl"))
    have = (cfg.get("model"), cfg.get("steps"), n_train, n_val, n_test)
    need = (s["teacher"], s["teacher_steps"], s["train"], s["val"], max(s["test"], TEST_POOL))
    if have != need:
        raise SystemExit(
            f"{src} has teacher {have[0]}/{have[1]} steps on {have[2]}/{have[3]}/{have[4]} train/val/test examples; "
            f"this run needs {need[0]}/{need[1]} on {need[2]}/{need[3]}/{need[4]}: drop --reuse-teacher."
        )
    for name in ("train.jsonl", "val.jsonl", "test_seen.jsonl", "test_unseen.jsonl"):
        if not (run / name).exists():
            shutil.copy2(src / name, run / name)
    for name in ("tokenizer", "teacher_sft"):
        if not (run / name).exists():
            shutil.copytree(src / name, run / name)
    timings = _load(src / "timings.json")
    if "teacher_sft" in timings and "teacher_sft" not in _load(run / "timings.json"):
        (run / "timings.json").write_text(
            json.dumps({"teacher_sft (reused)": timings["teacher_sft"]}, indent=2)
        )


def describe(preset: str) -> str:
    """One line naming a student preset and its shape."""
    from moe_understudy.moe.presets import preset_config

    c = preset_config(preset, 2048)
    experts = getattr(c, "num_local_experts", None)
    shape = f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}"
    return f"{preset} ({c.model_type}, {shape}" + (
        f", {experts} experts top-{c.num_experts_per_tok})" if experts else ")"
    )


def done(path: Path) -> bool:
    """A stage is done once its recipe wrote its summary log (written last, after the final checkpoint)."""
    return (path / "model.safetensors").exists() and any(path.glob("*_log.json"))


def train_all(run: Path, files: dict[str, Path], s: dict, console: Console) -> dict[str, Path]:
    """Every model of the table, trained (or found trained) under `run`; returns row name -> folder."""
    tok_dir = run / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train = load_instructions(files["train"])
        train_bpe([f"{e.prompt} {e.response}" for e in train], s["vocab"], tok_dir)
    common = dict(
        data=str(files["train"]),
        val_data=str(files["val"]),
        val_examples=s["val"],
        max_prompt=s["max_prompt"],
        max_total=s["max_total"],
        max_new_tokens=s["eval_new"],
    )
    timings: dict[str, float] = {}

    def sft(name: str, **kw) -> Path:
        out = run / name
        if not done(out):
            t0 = time.time()
            console.rule(f"SFT {name}")
            run_sft(SFTConfig(**common, **kw), out, resume=True, console=console)
            timings[name] = time.time() - t0
        return out

    def kd(name: str, **kw) -> Path:
        out = run / name
        if not done(out):
            t0 = time.time()
            console.rule(f"KD {name}")
            run_kd(
                KDConfig(
                    **common,
                    steps=s["kd_steps"],
                    batch_size=s["kd_bs"],
                    lr=s["kd_lr"],
                    gen_max_new_tokens=s["gen"],
                    eval_every=max(1, s["kd_steps"] // 2),
                    **kw,
                ),
                out,
                resume=True,
                console=console,
            )
            timings[name] = time.time() - t0
        return out

    tok = str(tok_dir)
    sft_kw = dict(batch_size=s["sft_bs"], lr=1e-3, tokenizer=tok)
    teacher = sft(
        "teacher_sft",
        model=s["teacher"],
        steps=s["teacher_steps"],
        eval_every=max(1, s["teacher_steps"] // 4),
        **sft_kw,
    )
    student = sft(
        "student_sft0",
        model=s["student"],
        steps=s["student_steps"],
        eval_every=max(1, s["student_steps"] // 4),
        **sft_kw,
    )
    moe_student = sft(
        "moe_student_sft0",
        model=s["moe_student"],
        steps=s["student_steps"],
        eval_every=max(1, s["student_steps"] // 4),
        **sft_kw,
    )
    rows = {
        "student SFT": sft(
            "student_sft",
            model=str(student),
            steps=s["kd_steps"],
            batch_size=s["kd_bs"],
            lr=s["kd_lr"],
            eval_every=max(1, s["kd_steps"] // 2),
            warmup=10,
        ),
    }
    for m in KD_METHODS:
        rows[m.upper() if m != "all" else "ALL"] = kd(
            f"kd_{m}", method=m, teacher=str(teacher), student=str(student)
        )
    rows["B-Distill (MoE student)"] = kd(
        "kd_bdistill", method="bdistill", teacher=str(teacher), student=str(moe_student)
    )
    rows["teacher SFT"] = teacher
    (run / "timings.json").write_text(json.dumps({**_load(run / "timings.json"), **timings}, indent=2))
    return rows


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def evaluate(rows: dict[str, Path], files: dict[str, Path], s: dict, run: Path, console: Console) -> dict:
    """ROUGE-L mean/std over seeds for each row on seen and unseen templates (cached per row)."""
    cache = _load(run / "scores.json")
    tests = {k: load_instructions(files[k])[: s["test"]] for k in SPLITS}
    for row, path in rows.items():
        # Entries from before per-example scores were kept are rescored (paired comparisons need them).
        missing = [k for k in COLUMNS if "per_example" not in cache.get(row, {}).get(k, {})]
        if not missing:
            continue
        console.print(f"scoring {row}: {', '.join(missing)}")
        model, tokenizer = load_model_and_tokenizer(path)
        for key in missing:
            split, greedy = key.removesuffix("_greedy"), key.endswith("_greedy")
            cache.setdefault(row, {})[key] = rouge_over_seeds(
                model,
                tokenizer,
                tests[split],
                seeds=SEEDS,
                greedy=greedy,
                max_new_tokens=s["eval_new"],
                max_prompt=s["max_prompt"],
                batch_size=100,
            ).summary()
            (run / "scores.json").write_text(json.dumps(cache, indent=2))
    return {row: cache[row] for row in rows}


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """Mean ROUGE-L difference a - b over the same test examples and its 95% half-width (paired, normal)."""
    diffs = [x - y for x, y in zip(a["per_example"], b["per_example"], strict=True)]
    return statistics.fmean(diffs), 1.96 * statistics.pstdev(diffs) / math.sqrt(len(diffs))


def verdict(scores: dict) -> list[str]:
    """Plain sentences: do KA and SAR beat KD and GKD, by how much, and is the gap beyond chance."""
    lines = []
    for split in COLUMNS:
        for new in ("KA", "SAR"):
            for base in ("KD", "GKD"):
                diff, half = paired_difference(scores[new][split], scores[base][split])
                word = "beats" if diff > 0.005 else "trails" if diff < -0.005 else "ties"
                lines.append(
                    f"{LABELS[split]}: {new} {word} {base} by {abs(diff):.2f} ROUGE-L "
                    f"({scores[new][split]['mean']:.2f} vs {scores[base][split]['mean']:.2f}; paired 95% "
                    f"interval ±{half:.2f}, {'significant' if abs(diff) > half else 'not significant'})."
                )
    teacher, student = scores["teacher SFT"], scores["student SFT"]
    gaps = {k: paired_difference(teacher[k], student[k]) for k in COLUMNS}
    lines.append(
        "Teacher SFT minus student SFT: "
        + ", ".join(f"{gap:+.2f} ± {half:.2f} ({LABELS[k]})" for k, (gap, half) in gaps.items())
        + " ROUGE-L: "
        + (
            "the teacher is significantly stronger everywhere, so there is something to distil."
            if all(gap > half for gap, half in gaps.values())
            else "the teacher is not significantly stronger everywhere, so distillation gains are not expected there."
        )
    )
    students = [r for r in scores if r != "teacher SFT"]
    best = max(max(scores[r][k]["mean"] for k in SPLITS) for r in students)
    teacher = scores["teacher SFT"]
    lines.append(
        f"Best student score {best:.2f} vs teacher {teacher['test_seen']['mean']:.2f} (seen) / "
        f"{teacher['test_unseen']['mean']:.2f} (unseen): "
        + (
            "the students did not learn the tasks at this budget, so this run cannot rank the methods."
            if best < max(LEARNED_FLOOR, 0.25 * teacher["test_seen"]["mean"])
            else "the students learned enough for the comparison to mean something."
        )
    )
    return lines


def plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(COLUMNS)
    for j, split in enumerate(COLUMNS):
        greedy = split.endswith("_greedy")
        ax.bar(
            [i - 0.4 + (j + 0.5) * width for i in x],
            [scores[n][split]["mean"] for n in names],
            width,
            yerr=None if greedy else [scores[n][split]["std"] for n in names],
            label=LABELS[split] + ("" if greedy else " (sampled, ± std over seeds)"),
            capsize=3,
            hatch="//" if greedy else None,
        )
    ax.set_xticks(list(x), names, rotation=20, ha="right")
    ax.set_ylabel("ROUGE-L F1 x100")
    ax.set_title("MoE -> student distillation on the T0 mix")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny smoke run (minutes), results not written")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the results JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--teacher", help="MoE teacher preset (default mixtral)")
    parser.add_argument("--student", help="dense student preset (default quick-student)")
    parser.add_argument("--moe-student", help="MoE student preset for B-Distill (default quick-moe-student)")
    parser.add_argument("--teacher-steps", type=int, help="teacher SFT steps (default 250)")
    parser.add_argument(
        "--student-steps", type=int, help="SFT steps of each student from scratch (default 150)"
    )
    parser.add_argument(
        "--kd-steps", type=int, help="steps of every KD method and of continued SFT (default 50)"
    )
    parser.add_argument("--train", type=int, help="training examples (default 4000)")
    parser.add_argument(
        "--val", type=int, help="validation examples for checkpoint choice, greedy ROUGE-L (default 32)"
    )
    parser.add_argument(
        "--test-examples",
        type=int,
        help=f"test examples scored per split (default {TEST_POOL}; above {TEST_POOL} the split is redrawn)",
    )
    parser.add_argument(
        "--out-dir", help="run folder for models and caches (default runs/kd_t0, runs/kd_t0_fast)"
    )
    parser.add_argument(
        "--reuse-teacher",
        help="earlier run folder whose data split, tokenizer and teacher SFT are copied in (same data settings)",
    )
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / f"{NAME}.json").read_text())["scores"], RESULTS / f"{NAME}.png")
        return 0
    console = Console()
    if not DATA.exists():
        console.print(f"[yellow]{DATA} is absent: the T0 distillation benchmark needs it; nothing to do.[/]")
        return 0
    torch.set_num_threads(args.threads)
    s = settings(args.fast, args)
    if s["test"] < 1 or s["val"] < 1 or s["train"] < 1:
        parser.error("--train, --val and --test-examples must be positive")
    run = Path(args.out_dir) if args.out_dir else ROOT / "runs" / (NAME + ("_fast" if args.fast else ""))
    run.mkdir(parents=True, exist_ok=True)
    if args.reuse_teacher:
        reuse_teacher(Path(args.reuse_teacher), run, s)
    t0 = time.time()
    files = prepare_data(run, s)
    rows = train_all(run, files, s, console)
    scores = evaluate(rows, files, s, run, console)

    table = Table(title="ROUGE-L F1 x100 on T0 templates (mean ± std over seeds 10-50)")
    table.add_column("method")
    for key in COLUMNS:
        table.add_column(LABELS[key], justify="right")
    for row, sc in scores.items():
        table.add_row(
            row,
            *(
                f"{sc[k]['mean']:.2f}" + ("" if k.endswith("_greedy") else f" ± {sc[k]['std']:.2f}")
                for k in COLUMNS
            ),
        )
    console.print(table)
    lines = verdict(scores)
    for line in lines:
        console.print(line)
    if args.fast:
        return 0
    plot(scores, RESULTS / f"{NAME}.png")
    path = write_result(
        NAME,
        {
            "settings": s,
            "models": {
                "teacher": describe(s["teacher"]),
                "student": describe(s["student"]),
                "moe_student": describe(s["moe_student"]),
            },
            "data": {
                "file": str(DATA),
                **{k: sum(1 for _ in open(p)) for k, p in files.items()},
                "split": "by template (task), 25% of templates unseen; prompts <= 400 chars, responses <= 16 words",
            },
            "protocol": "sampling temperature 1.0, top-p 1.0, top-k 0; ROUGE-L F1 (Porter stemmer) x100; seeds 10,20,30,40,50",
            "scores": scores,
            "verdict": lines,
            "train_seconds": _load(run / "timings.json"),
            "total_seconds_this_invocation": time.time() - t0,
            "note": "CPU shared with other jobs; timings are indicative only.",
            "anchor_eem_table1": {
                "KD": 20.92,
                "GKD": 25.07,
                "ALL": 25.32,
                "KA": 25.71,
                "SAR": 25.91,
                "student SFT": 21.82,
                "teacher SFT": 24.75,
            },
        },
    )
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
