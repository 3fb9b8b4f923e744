"""``dppa pat train``: LoRA + PAT tuning of a local HF model on prompt/response JSONL, then
binarise, fold, verify and save a plain, smaller transformers model with ``pat_report.json`` and
``pat_training.png``.

Everything the run could refuse (the data, keep, the architecture, the device, the output
folder) is checked before the model is loaded. The output is written into a temporary folder
beside ``out`` and renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from .arch import SUPPORTED_MODEL_TYPES
from .data import ALPACA_TEMPLATE, ResponseOnlyCollator, load_jsonl, tokenize_pairs
from .recipe import RECIPE, warmup_steps

REPORT = "pat_report.json"
PLOT = "pat_training.png"
MASK_SCHEDULES = ("paper", "code")
VERIFY_RTOL = 1e-5  # folded vs hard-masked logits, fp32


@dataclass
class TrainOptions:
    """Options of ``run_train`` (the CLI's flags). Defaults are the recipe's (``pat.RECIPE``)
    except ``mask_schedule``: "paper" (τ → ∞ after n0, no freeze) so that the last ⅔ of the run
    trains the hard-masked model that is folded; "code" (freeze at 0.8·n0) leaves the soft gates
    where they froze, which on short runs is far from 0/1 (see the report's loss gap)."""

    model: str
    data: str
    out: str
    keep: float = 0.75
    epochs: float = RECIPE.epochs
    max_steps: int = -1
    lora_rank: int = RECIPE.lora_rank
    lora_alpha: float = RECIPE.lora_alpha
    lora_dropout: float = RECIPE.lora_dropout
    learning_rate: float = RECIPE.learning_rate
    mask_lr: Union[float, str, None] = "auto"
    batch_size: int = RECIPE.batch_size
    grad_accum: int = RECIPE.grad_accum
    max_length: int = RECIPE.max_length
    hio_rank: Union[int, str] = RECIPE.hio_rank
    mask_schedule: str = "paper"
    template: str = ALPACA_TEMPLATE
    prompt_field: str = "prompt"
    response_field: str = "response"
    eval_rows: int = 64
    device: str = "cpu"
    seed: int = RECIPE.seed
    gradient_checkpointing: bool = False
    progress: bool = True
    force: bool = False
    extra: dict = field(default_factory=dict)


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction of the hidden size in (0, 1], got {keep!r}")
    return float(keep)


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device")
    return dev


def _check_model_dir(path: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model {path!r} is not a folder with a config.json (a local Hugging Face "
                         "model folder is needed)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"model {path!r}: config.json cannot be read ({exc})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model {path!r} has model_type {config.model_type!r}, which PAT does "
                         f"not support; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def _check_out(out: str, model: str, force: bool) -> Path:
    out_p = Path(out).expanduser().resolve()
    if out_p == Path(model).resolve() or Path(model).resolve() in out_p.parents:
        raise ValueError(f"output {str(out_p)!r} overlaps the input model folder")
    if out_p.exists() and not out_p.is_dir():
        raise ValueError(f"output {str(out_p)!r} exists and is not a folder")
    if out_p.is_dir() and any(out_p.iterdir()) and not force:
        raise ValueError(f"output {str(out_p)!r} is not empty; pass --force to replace it")
    return out_p


def validate(opts: TrainOptions):
    """All checks that need no model weights; returns (config, tokenizer, features, device)."""
    from transformers import AutoTokenizer

    if opts.mask_schedule not in MASK_SCHEDULES:
        raise ValueError(f"mask_schedule must be one of {MASK_SCHEDULES}, got "
                         f"{opts.mask_schedule!r}")
    keep = _check_keep(opts.keep)
    for name in ("batch_size", "grad_accum", "eval_rows"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "eval_rows" else 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not opts.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {opts.learning_rate!r}")
    if opts.max_steps <= 0 and not opts.epochs > 0:
        raise ValueError(f"epochs must be > 0 (or give max_steps), got {opts.epochs!r}")
    device = _check_device(opts.device)
    config = _check_model_dir(opts.model)
    if keep < 1.0:
        from .hsm import resolve_rank
        from .prepare import _resolve_keep

        _resolve_keep(keep, int(config.hidden_size))
        resolve_rank(opts.hio_rank, int(config.hidden_size))
    lora = opts.lora_rank
    if isinstance(lora, bool) or not isinstance(lora, int) or lora < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0: no LoRA), got {opts.lora_rank!r}")
    _check_out(opts.out, opts.model, opts.force)
    rows = load_jsonl(opts.data, opts.prompt_field, opts.response_field)
    try:
        tok = AutoTokenizer.from_pretrained(opts.model, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"model {opts.model!r}: no tokenizer could be loaded ({exc})") from None
    feats = tokenize_pairs(rows, tok, opts.template, opts.max_length)
    if len(feats) < 2:
        raise ValueError(f"data {opts.data!r}: {len(feats)} usable rows after tokenisation "
                         f"(max_length {opts.max_length}); at least 2 are needed")
    return config, tok, feats, device


def _split(feats: list, eval_rows: int, seed: int) -> tuple[list, list]:
    """Held-out rows for the closing loss gap: ``eval_rows`` at random, never all of the data."""
    n_eval = min(eval_rows, len(feats) // 10)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(feats), generator=g).tolist()
    held = set(order[:n_eval])
    return [f for i, f in enumerate(feats) if i not in held], [feats[i] for i in sorted(held)]


def _steps(opts: TrainOptions, n_train: int) -> int:
    """Optimizer steps of the run; refuses runs too short for the mask schedule (n0 ≥ 2)."""
    steps = opts.max_steps if opts.max_steps > 0 else math.ceil(
        opts.epochs * math.ceil(n_train / opts.batch_size) / opts.grad_accum)
    if opts.keep < 1.0:
        from .schedule import MaskSchedule

        MaskSchedule(total_steps=steps).length  # raises: "n0 must be >= 2"
    return steps


def _training_args(opts: TrainOptions, work: str, steps: int, device: torch.device):
    from transformers import TrainingArguments

    per_step = opts.batch_size * opts.grad_accum
    kw = dict(output_dir=work, max_steps=steps, per_device_train_batch_size=opts.batch_size,
              gradient_accumulation_steps=opts.grad_accum, learning_rate=opts.learning_rate,
              weight_decay=RECIPE.weight_decay, max_grad_norm=RECIPE.max_grad_norm,
              lr_scheduler_type=RECIPE.lr_scheduler_type, warmup_steps=warmup_steps(steps),
              seed=opts.seed, logging_steps=max(1, steps // 100), report_to=[],
              save_strategy="no", disable_tqdm=not opts.progress, dataloader_num_workers=0,
              gradient_checkpointing=opts.gradient_checkpointing, use_cpu=device.type == "cpu",
              bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
              remove_unused_columns=False)
    kw.update(opts.extra)
    return TrainingArguments(**kw), per_step


def run_train(opts: TrainOptions, echo: Callable[[str], None] = print) -> dict:
    """Train, binarise, fold, verify and save (see the module docstring); returns the report."""
    from transformers import AutoModelForCausalLM

    from . import add_lora, binarize, fold, get_mask, prepare, select_backend, verify
    from .report import count_parameters, mean_task_loss, plot_training
    from .schedule import MaskSchedule
    from .trainer import PATTrainer

    t0 = time.perf_counter()
    config, tok, feats, device = validate(opts)
    out = _check_out(opts.out, opts.model, opts.force)
    train_f, eval_f = _split(feats, opts.eval_rows, opts.seed)
    steps = _steps(opts, len(train_f))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    collator = ResponseOnlyCollator(int(pad))
    timings = {"validate_s": time.perf_counter() - t0}

    t = time.perf_counter()
    torch.manual_seed(opts.seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype, local_files_only=True)
    base.to(device)
    params_before = count_parameters(base)
    d = int(config.hidden_size)
    model = add_lora(base, opts.lora_rank, opts.lora_alpha, opts.lora_dropout) \
        if opts.lora_rank > 0 else base
    pruning = opts.keep < 1.0
    backend = None
    if pruning:
        freeze = None if opts.mask_schedule == "paper" else MaskSchedule().freeze
        # CUDA: the fused Triton HSM kernels (auto falls back to torch with a warning if Triton
        # cannot run); CPU: the torch reference, never the Triton interpreter (a testing tool)
        backend = select_backend("auto", device) if device.type == "cuda" else "torch"
        prepare(model, keep=opts.keep, rank=opts.hio_rank, schedule=MaskSchedule(freeze=freeze),
                backend=backend)
    timings["load_s"] = time.perf_counter() - t

    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{out.name}.pat-partial-", dir=parent)
    try:
        args, per_step = _training_args(opts, os.path.join(work, "trainer"), steps, device)
        echo(f"PAT: {type(base).__name__} d={d} -> keep {opts.keep:g} "
             f"({'target ' + str(get_mask(model).target) if pruning else 'no pruning'}), "
             f"{len(train_f)} training rows, {steps} steps of {per_step}, HSM backend {backend}, "
             f"device {device}")
        t = time.perf_counter()
        if pruning:
            trainer = PATTrainer(model=model, args=args, train_dataset=train_f,
                                 data_collator=collator, mask_lr=opts.mask_lr)
        else:
            from transformers import Trainer

            trainer = Trainer(model=model, args=args, train_dataset=train_f,
                              data_collator=collator)
        trainer.train()
        timings["train_s"] = time.perf_counter() - t

        t = time.perf_counter()
        model = model.float().eval()
        loss_soft = mean_task_loss(model, eval_f, collator) if eval_f else None
        bin_report, loss_hard = None, loss_soft
        if pruning:
            bin_report = binarize(model)
            loss_hard = mean_task_loss(model, eval_f, collator) if eval_f else None
            folded = fold(model, dtype=torch.float32)
        else:
            folded = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        ids = collator(eval_f[:4] or train_f[:4])["input_ids"].to(device)
        fold_err = verify(folded, model, ids) if pruning else 0.0
        if not fold_err <= VERIFY_RTOL:
            raise RuntimeError(f"the folded model differs from the masked model: relative logit "
                               f"error {fold_err:.3g} > {VERIFY_RTOL:g}")
        timings["binarize_fold_verify_s"] = time.perf_counter() - t

        t = time.perf_counter()
        final = os.path.join(work, "model")
        save_dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(save_dtype, str):
            save_dtype = getattr(torch, save_dtype, torch.float32)
        folded.to(dtype=save_dtype).save_pretrained(final)
        tok.save_pretrained(final)
        reloaded = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).float()
        reload_err = verify(reloaded.to(device).eval(), folded.float(), ids)
        timings["save_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0

        hist = [r for r in trainer.state.log_history if "loss" in r]
        report = {
            "model": opts.model, "data": opts.data, "device": str(device), "hsm_backend": backend,
            "keep": opts.keep, "hidden_size": d,
            "kept_width": int(folded.config.hidden_size),
            "target_width": get_mask(model).target if pruning else d,
            "binarize": bin_report,
            "params_before": params_before, "params_after": count_parameters(folded),
            "steps": steps, "train_rows": len(train_f), "eval_rows": len(eval_f),
            "losses": {"first_logged": hist[0] if hist else None,
                       "last_logged": hist[-1] if hist else None,
                       "eval_soft_mask": loss_soft, "eval_hard_mask": loss_hard,
                       "closing_gap": None if loss_soft is None else loss_hard - loss_soft},
            "fold_rel_err": fold_err, "reload_rel_err": reload_err,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "options": {k: v for k, v in asdict(opts).items() if k not in ("extra",)},
            "log_history": trainer.state.log_history,
        }
        (Path(final) / REPORT).write_text(json.dumps(report, indent=1, default=str))
        if pruning:
            plot_training(trainer.state.log_history, Path(final) / PLOT,
                          target=get_mask(model).target,
                          title=f"PAT: keep {opts.keep:g} of d={d} -> d'={report['kept_width']}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report
