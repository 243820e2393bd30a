"""The `sketchtune` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cliargs import add_options, config_from_args, positive_int
from .compare import CompareConfig
from .compression import SketchConfig
from .data.registry import MIX, task_names
from .data.tasks import CALIB_HELP
from .devices import DEVICE_HELP
from .errors import SketchtuneError
from .finetune_config import FinetuneConfig
from .format import FormatError
from .mixing import MixConfig

DEFAULT_MODEL = "smollm2-135m"


SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or plain bytes -> bytes."""
    number = text.strip().upper()
    digits = number.rstrip("KMGTIB")
    unit = number[len(digits):]
    if not digits.isdigit() or unit not in SIZE_UNITS or int(digits) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB or 500MB, got {text!r}")
    return int(digits) * SIZE_UNITS[unit]


def _print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))


def cmd_compress(args: argparse.Namespace) -> None:
    from .api import compress_to_folder

    config = config_from_args(SketchConfig, args)
    summary = compress_to_folder(
        args.model, args.output, config, args.samples, args.seq_len, args.calib, args.seed,
        force=args.force, device=args.device, max_shard_size=args.max_shard_size,
    )
    _print_json(summary)


def cmd_mix(args: argparse.Namespace) -> None:
    from .api import mix_to_folder

    summary = mix_to_folder(args.folders, args.output, config_from_args(MixConfig, args),
                            force=args.force, max_shard_size=args.max_shard_size)
    _print_json(summary)


def cmd_generate(args: argparse.Namespace) -> None:
    from .api import load_any
    from .generate import generate_text

    model, tokenizer = load_any(args.model, args.task_sketch)  # the fast inference path
    print(
        generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat,
            compile=args.compile,
        )
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from .api import load_any
    from .atomic import check_output_file, write_json_atomic
    from .evaluate.run import check_task, evaluate

    if args.output:
        check_output_file(args.output)
    tasks = [check_task(t.strip(), args.protocol, args.data_root) for t in args.task.split(",")]
    model, tokenizer = load_any(args.model, args.task_sketch)
    summary = {"model": args.model, "task_sketch": args.task_sketch, "results": []}
    for task in tasks:
        result = evaluate(
            model, tokenizer, task, args.protocol, args.limit, args.batch_size, args.data_root,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, samples=args.samples,
            seq_len=args.seq_len, text=args.text,
        )
        summary["results"].append({**result, "model": args.model})
        if args.output:  # after every task: a long run keeps what it finished
            write_json_atomic(args.output, summary)
    _print_json(summary)


def cmd_finetune(args: argparse.Namespace) -> None:
    from .train import finetune

    config = config_from_args(FinetuneConfig, args)
    summary = finetune(
        args.model, args.data, args.output, config, resume=args.resume, force=args.force,
        data_root=args.data_root,
    )
    _print_json({k: v for k, v in summary.items() if k not in ("settings", "data_report")})


def cmd_export(args: argparse.Namespace) -> None:
    from .api import load_any
    from .atomic import check_output_dir
    from .export import export_dense

    check_output_dir(args.output, args.force)
    model, tokenizer = load_any(args.model, args.task_sketch, serve=False)
    export_dense(model, tokenizer, args.output, force=args.force)
    print(f"dense model written to {args.output}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_base, convert_task_sketch

    if args.base is not None:
        summary = convert_base(args.checkpoint, args.base, args.output, force=args.force)
    else:
        summary = convert_task_sketch(args.checkpoint, args.sketched, args.output, force=args.force)
    _print_json(summary)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare

    config = config_from_args(CompareConfig, args)
    compare(config, args.output, force=args.force)
    print((Path(args.output) / "results.md").read_text())


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.output_dir), args.samples, args.seq_len, args.steps, args.limit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketchtune", description="Compress LLMs into learned sketches and fine-tune them."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compress", help="sketch every linear projection of a model")
    p.add_argument("model", help=f"hub id, local folder, or {DEFAULT_MODEL!r} (embedded)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_options(p, SketchConfig)
    p.add_argument("--samples", type=positive_int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    p.add_argument("--calib", help=CALIB_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=f"where blocks are sketched: {DEVICE_HELP}")
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest safetensors file; bigger models are sharded (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("mix", help="one sketch from several of the same model under a bit budget")
    p.add_argument("folders", nargs="+", help="sketched folders of one base (from compress)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_options(p, MixConfig)
    p.add_argument("--max-shard-size", type=_size, default="5GB",
                   help="largest safetensors file; bigger models are sharded (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_mix)

    p = sub.add_parser("generate", help="generate text with a (sketched) model")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--task-sketch", help="apply this fine-tuned task sketch first")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile: about a minute to compile, then faster "
                   "decoding (for long generations)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a (sketched) model")
    p.add_argument("model")
    p.add_argument("--task", default="ppl",
                   help=f"comma-separated: {task_names()}, an LLM-Adapters-format file, "
                        "or ppl (held-out text)")
    p.add_argument("--protocol", choices=("generate", "loglik", "nll"), default="generate",
                   help="generated reply + answer extraction, log-likelihood multiple choice, "
                        "or NLL of the gold responses (ppl ignores it)")
    p.add_argument("--limit", type=positive_int, help="a fixed random subset of this many items")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--num-beams", type=positive_int, default=1, help="beam search when > 1")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="reply length (default 32 for label answers, 256 for math)")
    p.add_argument("--data-root", help="folder with the shared data (default ../shared/data)")
    p.add_argument("--samples", type=positive_int, default=32, help="ppl: text windows")
    p.add_argument("--seq-len", type=positive_int, default=512, help="ppl: tokens per window")
    p.add_argument("--text", help="ppl: text file to measure instead of the held-out default")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--task-sketch", help="apply this fine-tuned task sketch first")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="train the sketch values of a sketched model")
    p.add_argument("model", help="sketched model folder (from `sketchtune compress`)")
    p.add_argument("--data", required=True,
                   help=f"{MIX} (the training mix), a task name, an LLM-Adapters folder name, "
                        "or a .json/.jsonl file")
    p.add_argument("-o", "--output", required=True, help="task sketch folder to write")
    add_options(p, FinetuneConfig)
    p.add_argument("--data-root", help="folder with the shared data (default ../shared/data)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="write a plain dense transformers model")
    p.add_argument("model", help="sketched model folder")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--task-sketch", help="apply this fine-tuned task sketch first")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="open a checkpoint published by the SketchTune authors")
    p.add_argument("checkpoint",
                   help="their base .pkl (e.g. llama-3-8b-int4-gpr4.pkl) or a fine-tuned "
                   "sketched_params.pkl; read without running any code from it")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", metavar="MODEL",
                        help="the dense model the base .pkl was made from: writes a sketched "
                        "folder")
    source.add_argument("--sketched", metavar="DIR",
                        help="the folder converted from the fine-tuned checkpoint's base: "
                        "writes a task sketch")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compare", help="SketchTune vs dense, LoRA, DoRA, QLoRA-style, one table")
    add_options(p, CompareConfig)
    p.add_argument("-o", "--output", required=True, help="folder for the tables and chart")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_compare)

    from .analyze.cli import add_analyze_parser

    add_analyze_parser(sub)

    p = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--samples", type=positive_int, default=8, help="calibration sequences")
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--steps", type=positive_int, default=30, help="fine-tuning steps per method")
    p.add_argument("--limit", type=positive_int, default=100, help="held-out test items")
    p.set_defaults(func=cmd_demo)
    return parser


def _close_progress_bars() -> None:
    """A bar left open by the failure ends without a newline: close it, so that the message
    starts a line of its own."""
    tqdm = sys.modules.get("tqdm.std")  # never imported: no bar to close
    for bar in list(getattr(tqdm.tqdm, "_instances", ())) if tqdm is not None else ():
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (SketchtuneError, FormatError) as exc:
        _close_progress_bars()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted: nothing half-written was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
