"""``moe-generate``, ``moe-eval`` and ``moe-export``: a trained run directory in, text, scores
or a Hugging Face model out.  Problems end the command with one line on stderr naming what is
wrong and the way out, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moe.config import ConfigError


def _fail(prog: str, msg: str, code: int = 2) -> None:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# moe-generate


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-generate",
        description="Continue a prompt with a trained run's model (KV-cache decoding, dropless routing).",
    )
    p.add_argument("run", help="run directory (or its checkpoint.pt / pipeline.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="text to continue (default: start of a document)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set reaching this probability")
    p.add_argument("--seed", type=int, default=None, help="repeatable sampling")
    p.add_argument("--no-stop", action="store_true", help="go on past the end-of-text token")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--ids", action="store_true", help="print token ids, not text")
    return p


def generate_main(argv: list[str] | None = None) -> None:
    """Console script ``moe-generate``."""
    args = generate_parser().parse_args(argv)
    prog = "moe-generate"
    if args.max_new_tokens < 1:
        _fail(prog, f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    from moe.inference.generate import Sampling, TextStream, generate
    from moe.inference.load import load_run

    try:
        how = Sampling(greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        _fail(prog, str(e))
    _threads(args.threads)
    try:
        run = load_run(args.run, device=args.device)
    except (ConfigError, ValueError, RuntimeError) as e:  # RuntimeError: torch's, for a --device it cannot use
        _fail(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
    tok = run.tokenizer
    if tok is None:
        _fail(prog, f"{args.run} trained on pre-tokenized ids and has no tokenizer: there is no text to prompt with")
    text = args.prompt
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            _fail(prog, f"--prompt-file {args.prompt_file}: {e}")
    prompt = [tok.eot_id] + (tok.encode(text) if text else [])  # a document starts after end-of-text
    limit = run.cfg.model.seq_len
    if len(prompt) > limit:
        print(f"{prog}: the prompt has {len(prompt)} tokens; keeping its last {limit} (model.seq_len)", file=sys.stderr)
    print(
        f"{run.path} (step {run.step}, {run.cfg.model.block} block, moe={run.cfg.moe.name}) on {run.device}",
        file=sys.stderr,
    )
    if text and not args.ids:
        sys.stdout.write(text)
    stream = TextStream(tok.decode)
    n, t0 = 0, time.perf_counter()
    stop = None if args.no_stop else tok.eot_id
    for token in generate(run.model, prompt, args.max_new_tokens, how, seed=args.seed, stop=stop):
        n += 1
        if token == stop:
            break
        piece = f"{token} " if args.ids else stream.add(token)
        sys.stdout.write(piece)
        sys.stdout.flush()
    if not args.ids:
        sys.stdout.write(stream.flush())
    sys.stdout.write("\n")
    seconds = time.perf_counter() - t0
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# moe-eval


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-eval",
        description="Loss, perplexity, bits per byte and expert load of a trained run's model on text.",
    )
    p.add_argument("run", help="run directory (or its checkpoint.pt / pipeline.json)")
    p.add_argument("--data", required=True, help="a text file, a folder of text files, or a .bin of token ids")
    p.add_argument(
        "--extensions", default="", help="in a folder, only files ending so, comma-separated (default: every file)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's seq_len)")
    p.add_argument("--json", default=None, help="also write the results here as JSON")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    return p


def eval_main(argv: list[str] | None = None) -> None:
    """Console script ``moe-eval``."""
    args = eval_parser().parse_args(argv)
    prog = "moe-eval"
    from moe.inference.evaluate import evaluate_text, load_table, read_eval_text
    from moe.inference.load import load_run
    from moe.training.files import write_text_atomic

    _threads(args.threads)
    try:
        run = load_run(args.run, device=args.device)
        if args.seq_len and not 2 <= args.seq_len + 1 <= run.cfg.model.seq_len + 1:
            raise ConfigError(f"--seq-len={args.seq_len} must be in [1, {run.cfg.model.seq_len}] (model.seq_len)")
        exts = [e.strip() for e in args.extensions.split(",") if e.strip()] or None
        if args.json and not Path(args.json).expanduser().resolve().parent.is_dir():
            raise ConfigError(f"--json {args.json}: its folder does not exist")
        text = read_eval_text(
            args.data,
            run.tokenizer,
            extensions=exts,
            bin_dtype=run.cfg.data.bin_dtype,
            vocab_size=run.cfg.model.vocab_size,
        )
        r = evaluate_text(run.model, text, seq_len=args.seq_len or None, batch_size=args.batch_size)
    except (ConfigError, ValueError, RuntimeError) as e:  # RuntimeError: torch's, for a --device it cannot use
        _fail(prog, str(e).splitlines()[0] if str(e) else type(e).__name__)
    r = {"run": str(run.path), "step": run.step, "data": str(args.data), **r}
    bpb = "n/a (token ids)" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.4f}"
    print(f"{run.path} (step {run.step}) on {args.data}: {r['files']} file(s), {r['tokens']:,} tokens predicted")
    speed = f"{r['tokens_per_s']:,.0f} tok/s"
    print(f"  loss {r['loss']:.4f}   perplexity {r['perplexity']:.3f}   bits/byte {bpb}   ({speed})")
    if r["skipped"]:
        print(f"  skipped {len(r['skipped'])} file(s), e.g. {r['skipped'][0]['file']} {r['skipped'][0]['reason']}")
    lines = load_table(r["expert_load"])
    if lines:
        print("expert load (assignments per expert, dropless):")
        print("\n".join(lines))
    if args.json:
        write_text_atomic(Path(args.json).expanduser(), json.dumps(r, indent=2))
        print(f"wrote {args.json}")


# ---------------------------------------------------------------------------------------------
# moe-export


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moe-export",
        description="Write a trained run's model in the Hugging Face format (safetensors, config, tokenizer).",
    )
    p.add_argument("run", help="run directory (or its checkpoint.pt / pipeline.json)")
    p.add_argument("out_dir", help="the model directory to write (AutoModelForCausalLM.from_pretrained(OUT_DIR))")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return p


def export_main(argv: list[str] | None = None) -> None:
    """Console script ``moe-export``."""
    args = export_parser().parse_args(argv)
    prog = "moe-export"
    try:
        import safetensors  # noqa: F401
    except ImportError:
        _fail(prog, "moe-export writes safetensors: pip install 'moe[hf]' (or pip install safetensors)")
    from moe.inference.export import export_run

    try:
        r = export_run(args.run, args.out_dir, overwrite=args.overwrite)
    except (ConfigError, ValueError) as e:
        _fail(prog, str(e))
    print(
        f"wrote {r['out_dir']}: {r['architecture']}, {r['parameters']:,} parameters in {r['tensors']} tensors "
        f"(step {r['step']})"
    )
    print(
        "load it with: from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"AutoModelForCausalLM.from_pretrained({r['out_dir']!r})"
    )
