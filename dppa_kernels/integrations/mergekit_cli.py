"""``dppa-mergekit-yaml CONFIG OUT [mergekit options]``: ``mergekit-yaml`` with our backend.

Same arguments (mergekit's own option set, plus ``--no-fast-path`` and ``--allow-pickle``),
same output layout. Two paths:

* **fast path** (default when eligible, see :mod:`.mergekit_fast`): the config and options are
  entirely within what our streaming engine reproduces, so it merges directly, without importing
  mergekit, transformers or PEFT, and writes mergekit's layout.
* **fallback** (:mod:`.mergekit_fallback`): mergekit's own pipeline with our backend installed
  for the run; the DPPA statistics pre-pass runs first when ``merge_method`` is dppa / dppa_ties.

Only "the fast path does not reproduce this" (:class:`.mergekit_fast.Unsupported`) hands a run to
the fallback; a refusal (an output overlapping an input, a pickle without ``--allow-pickle``, a
corrupt input, a NaN/Inf delta, a failed write...) ends it: one ``error: ...`` line, exit code 1.
Both paths seed DARE/DELLA draws from ``--random-seed`` (default 0) and give bit-identical
tensors. ``--no-fast-path`` or ``DPPA_MERGEKIT_FAST=0`` forces the fallback; ``-v`` prints why a
run falls back. Also runnable as ``python -m dppa_kernels.integrations.mergekit_cli``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from ._deps import require

PROG = "dppa-mergekit-yaml"
FAST_ENV = "DPPA_MERGEKIT_FAST"
NO_FAST = "--no-fast-path"
_NO_FAST_HELP = f"Run mergekit's own pipeline (with our backend) even when the fast path applies [env {FAST_ENV}=0]"
ALLOW_PICKLE = "--allow-pickle"
_ALLOW_PICKLE_HELP = ("Accept pickle (.bin) checkpoints: they can run code when loaded; loaded only with torch >= 2.6 "
                      "and weights_only")

# mergekit 0.1.5's merge options (mergekit/options.py), mirrored so the fast path parses the
# command line without importing mergekit: (field, kind, default)
_BOOL_OPTIONS = (("allow_crimes", False), ("unsafe_truncate_embeddings", False), ("cuda", False),
                 ("low_cpu_memory", False), ("copy_tokenizer", True), ("clone_tensors", False),
                 ("trust_remote_code", False), ("lazy_unpickle", False), ("write_model_card", True),
                 ("safe_serialization", True), ("quiet", False), ("read_to_gpu", False), ("multi_gpu", False),
                 ("async_write", False))
_STR_OPTIONS = ("transformers_cache", "lora_merge_cache", "lora_merge_dtype", "device")
_INT_OPTIONS = (("random_seed", None, ("--random-seed",)), ("num_threads", None, ("--num-threads", "-j")),
                ("write_threads", 1, ("--write-threads",)))


def parse_size(value) -> int:
    """mergekit's shard-size syntax: an integer, optionally with a K, M or B (10^3/6/9) suffix."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    mult = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower())
    if mult is None or not text[:-1].isdigit():
        from ..engine.errors import brief

        raise ValueError(f"{brief(value)} is not a size (examples: 5B, 500M, 1000000)")
    return int(text[:-1]) * mult


def _fast_command():
    """A click command with mergekit's options (parsing only; built without mergekit)."""
    import click

    class Size(click.ParamType):
        name = "size"

        def convert(self, value, param, ctx):
            try:
                return parse_size(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)

    opt = click.Option
    params = [click.Argument(["config_file"]), click.Argument(["out_path"])]
    params += [opt([f"--{n.replace('_', '-')}/--no-{n.replace('_', '-')}"], default=d) for n, d in _BOOL_OPTIONS]
    params += [opt([f"--{n.replace('_', '-')}"], type=str, default=None) for n in _STR_OPTIONS]
    params += [opt([*flags, n], type=int, default=d) for n, d, flags in _INT_OPTIONS]
    params += [opt(["--out-shard-size", "out_shard_size"], type=Size(), default="5B"),
               opt(["-v", "verbosity"], count=True), opt(["--gpu-rich"], is_flag=True, default=False),
               opt([ALLOW_PICKLE, "allow_pickle"], is_flag=True, default=False)]
    return click.Command(PROG, params=params)


def parse_fast(args: Sequence[str]) -> Optional[dict]:
    """mergekit's options as a dict (field names as in mergekit's MergeOptions), or None when the
    command line is not understood here (mergekit's parser then reports or handles it)."""
    import click

    try:
        ctx = _fast_command().make_context(PROG, list(args), resilient_parsing=False)
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        return None
    return dict(ctx.params)


def try_fast(args: Sequence[str]) -> bool:
    """Run the fast path if it applies; False (nothing written) when the fallback must run.
    A refusal raises MergeError: it is never a reason to fall back."""
    opts = parse_fast(args)
    verbose = opts["verbosity"] if opts else sum(a.count("v") for a in args if a.startswith("-v"))

    def say(why: str) -> bool:
        if verbose:
            print(f"{PROG}: fast path off ({why}); running mergekit with our backend", file=sys.stderr)
        return False

    if opts is None:
        return say("command line not understood by the fast path")
    from .mergekit_fast import Unsupported, plan_fast, run_fast

    try:
        plan = plan_fast(opts, opts["config_file"], opts["out_path"])
    except Unsupported as exc:
        return say(str(exc))
    run_fast(plan)
    return True


def build_command():
    """The mergekit click command; built on first use so a missing mergekit is a clear ImportError."""
    click = require("click", "mergekit", PROG)
    require("mergekit", "mergekit", PROG)
    from mergekit.options import PrettyPrintHelp, add_merge_options

    from .mergekit_fallback import run_fallback

    @click.command(PROG, cls=PrettyPrintHelp)
    @click.argument("config_file")
    @click.argument("out_path")
    @click.option(NO_FAST, "no_fast_path", is_flag=True, help=_NO_FAST_HELP)
    @click.option(ALLOW_PICKLE, "allow_pickle", is_flag=True, help=_ALLOW_PICKLE_HELP)
    @add_merge_options
    def command(merge_options, config_file: str, out_path: str, no_fast_path: bool, allow_pickle: bool) -> None:
        merge_options.apply_global_options()
        run_fallback(config_file, out_path, merge_options, allow_pickle=allow_pickle)

    return command


def _fail(message: str, code: int = 1) -> None:
    from ..engine.errors import one_line

    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from .._exit import exit_now, unexpected
    from ..engine.errors import MergeError

    args = list(sys.argv[1:] if argv is None else argv)
    fast = NO_FAST not in args and os.environ.get(FAST_ENV, "1").strip() != "0" and "--help" not in args
    args = [a for a in args if a != NO_FAST]
    try:
        if fast and try_fast(args):
            if argv is None:  # the console script: the output is committed, skip torch's teardown
                exit_now(0)
            return
        build_command()(args=args, prog_name=PROG)
    except MergeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was moved into the output folder", 130)
    except Exception as exc:  # noqa: BLE001 (every failure of the command is one line)
        _fail(unexpected(exc))


if __name__ == "__main__":
    main()
