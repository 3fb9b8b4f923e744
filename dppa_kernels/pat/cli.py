"""``dppa pat ...``: pruning-aware tuning from the command line."""

from __future__ import annotations

from typing import Optional

import typer

from .recipe import RECIPE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="PAT: pruning-aware tuning (LoRA + HSMs + one shared channel mask), then an "
                       "exact fold into a smaller dense model.")


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _rank(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(f"must be an int or 'auto', got {text!r}") from None


def _mask_lr(text: str):
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"must be a number, 'auto' or 'none', got {text!r}") from None


@app.command()
def train(
    model: str = typer.Option(..., "--model", help="local Hugging Face model folder (Llama, "
                                                   "Mistral or Qwen2, with its tokenizer)"),
    data: str = typer.Option(..., "--data", help="JSONL, one {\"prompt\": ..., \"response\": ...} "
                                                 "per line"),
    keep: float = typer.Option(0.75, "--keep", help="fraction of hidden channels kept, in (0, 1]; "
                                                    "1 = dense LoRA, no pruning"),
    out: str = typer.Option(..., "--out", "-o", help="output folder for the folded model"),
    epochs: float = typer.Option(RECIPE.epochs, "--epochs"),
    max_steps: int = typer.Option(-1, "--max-steps", help="optimizer steps (overrides --epochs)"),
    lora_rank: int = typer.Option(RECIPE.lora_rank, "--lora-rank", help="0 = no LoRA"),
    lora_alpha: float = typer.Option(RECIPE.lora_alpha, "--lora-alpha"),
    lr: float = typer.Option(RECIPE.learning_rate, "--lr",
                             help="one learning rate for LoRA and HSMs"),
    mask_lr: str = typer.Option("auto", "--mask-lr", help="mask proxy learning rate: auto = "
                                "max(lr, 0.5/n0), none = --lr, or a number"),
    hio_rank: str = typer.Option("auto", "--hio-rank", help="HSM rank: auto = min(200, 5% of d)"),
    mask_schedule: str = typer.Option("paper", "--mask-schedule",
                                      help="paper: hard gate after n0; code: freeze at 0.8·n0"),
    batch_size: int = typer.Option(RECIPE.batch_size, "--batch-size"),
    grad_accum: int = typer.Option(RECIPE.grad_accum, "--grad-accum"),
    max_length: int = typer.Option(RECIPE.max_length, "--max-length"),
    template: Optional[str] = typer.Option(None, "--template", help="prompt template with {prompt} "
                                           "(default: the alpaca-style instruction template)"),
    prompt_field: str = typer.Option("prompt", "--prompt-field", help="JSONL field of the prompt"),
    response_field: str = typer.Option("response", "--response-field",
                                       help="JSONL field of the response (e.g. answer)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda[:N] (cuda: bf16 autocast, "
                                                       "fused Triton HSM kernels)"),
    seed: int = typer.Option(RECIPE.seed, "--seed"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
) -> None:
    """Train LoRA + PAT on DATA, binarise, fold, verify and save a plain smaller model to OUT
    (with pat_report.json and pat_training.png)."""
    from .pipeline import TrainOptions, run_train

    kw = {} if template is None else {"template": template}
    opts = TrainOptions(model=model, data=data, out=out, keep=keep, epochs=epochs,
                        max_steps=max_steps, lora_rank=lora_rank, lora_alpha=lora_alpha,
                        learning_rate=lr, mask_lr=_mask_lr(mask_lr), hio_rank=_rank(hio_rank),
                        mask_schedule=mask_schedule, batch_size=batch_size, grad_accum=grad_accum,
                        max_length=max_length, device=device, seed=seed,
                        prompt_field=prompt_field, response_field=response_field,
                        gradient_checkpointing=gradient_checkpointing, force=force,
                        progress=not no_progress, **kw)
    try:
        rep = run_train(opts, echo=typer.echo)
    except (ValueError, TypeError) as exc:
        _fail(str(exc), 2)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", 130)
    loss = rep["losses"]
    gap = loss["closing_gap"]
    typer.echo(f"done: d={rep['hidden_size']} -> d'={rep['kept_width']}, parameters "
               f"{rep['params_before']:,} -> {rep['params_after']:,}, fold error "
               f"{rep['fold_rel_err']:.2e}"
               + ("" if gap is None else f", held-out loss soft {loss['eval_soft_mask']:.4f} / "
                                         f"hard {loss['eval_hard_mask']:.4f} (gap {gap:+.4f})")
               + f", {rep['timings']['total_s']:.0f} s -> {out}")


@app.command()
def demo(
    out: str = typer.Argument(..., help="folder to create (model/, train.jsonl, test.jsonl)"),
    pretrain_steps: int = typer.Option(300, "--pretrain-steps"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a small Llama pretrained on the package's synthetic tasks, and prompt/response
    JSONL of those tasks: a local starting point for `dppa pat train`."""
    from .demo import DEMO_TEMPLATE, make_demo

    try:
        paths = make_demo(out, pretrain_steps=pretrain_steps, seed=seed, echo=typer.echo)
    except ValueError as exc:
        _fail(str(exc), 2)
    typer.echo(f"next: dppa pat train --model {paths['model']} --data {paths['train']} "
               f"--template '{DEMO_TEMPLATE}' --keep 0.75 --out {out}/pat")
