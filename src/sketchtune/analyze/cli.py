"""`sketchtune analyze`: argument parsing and printing only; the work is in pipeline.py."""

from __future__ import annotations

import argparse

from ..cliargs import at_least, positive_int
from ..data.tasks import CALIB_HELP
from ..errors import SketchtuneError
from ..format import SUPPORTED_BITS, SUPPORTED_GPR


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="sketch or low rank? compare both on a model's fine-tuning update, layer by layer",
        description="For every sketched projection, the relative error of the best rank-r "
        "update, of the best values-only update of the sketch (frozen codes) and of a sketch "
        "learned for the update (free codes), at the same parameter count, in Frobenius norm "
        "and weighted by the layer's input Hessian.",
    )
    p.add_argument("model", nargs="?",
                   help="dense model (hub id, folder, 'smollm2-135m') or sketched folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--delta", help="fine-tuned dense model folder, or a task sketch folder")
    source.add_argument("--short-finetune", metavar="DATA",
                        help="fine-tune the dense model briefly on DATA (task name or .jsonl)")
    p.add_argument("--base", help="dense model a sketched MODEL came from (default: the sketch's "
                   "reconstruction)")
    p.add_argument("--steps", type=positive_int, default=20, help="short fine-tune steps")
    p.add_argument("--lr", type=float, default=5e-5, help="short fine-tune learning rate")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--seq-len", type=positive_int, default=128, help="fine-tune tokens per example")
    p.add_argument("--params-per-layer", type=positive_int,
                   help="low-rank budget (default: the sketch's d_out * gpr * 2**bits)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, help="dense MODEL (default 4)")
    p.add_argument("--gpr", type=int, choices=SUPPORTED_GPR, help="dense MODEL (default 4)")
    p.add_argument("--sample-rows", type=at_least(0), default=128,
                   help="rows per layer for the sketch errors (0: all; k-means dominates the time)")
    p.add_argument("--hessian-samples", type=positive_int, default=4, help="calibration windows")
    p.add_argument("--hessian-seq-len", type=positive_int, default=256)
    p.add_argument("--calib", help=CALIB_HELP)
    p.add_argument("--synthetic", action="store_true",
                   help="also compare on synthetic matrix classes (alone when MODEL is left out)")
    p.add_argument("--data-root", help="folder with the shared data (default ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="runs/analyze", help="folder for JSON, CSV, PNG")
    p.set_defaults(func=cmd_analyze)
    return p


def cmd_analyze(args: argparse.Namespace) -> None:
    from ..atomic import write_json_atomic
    from .pipeline import AnalyzeRequest, HessianSettings, analyze_model
    from .report import Budget, write_outputs
    from .sources import FinetuneSettings
    from .synthetic import format_table, synthetic_table

    if args.model is None:
        if not args.synthetic:
            raise SketchtuneError("give a MODEL, or --synthetic for the synthetic classes alone")
        table = synthetic_table(bits=args.bits or 4, gpr=args.gpr or 4, seed=args.seed)
        print(format_table(table))
        print(f"wrote {write_json_atomic(f'{args.output}/synthetic.json', table)}")
        return
    request = AnalyzeRequest(
        model=args.model, delta=args.delta, short_finetune=args.short_finetune, base=args.base,
        bits=args.bits, gpr=args.gpr, synthetic=args.synthetic, data_root=args.data_root,
        finetune=FinetuneSettings(args.steps, args.lr, args.batch_size, args.seq_len, args.seed),
        budget=Budget(args.params_per_layer, args.sample_rows, args.seed),
        hessian=HessianSettings(args.hessian_samples, args.hessian_seq_len, args.calib, args.seed),
    )
    result = analyze_model(request)
    paths = write_outputs(result, args.output)
    if "synthetic" in result:
        print(format_table(result["synthetic"]))
    print(result["summary"])
    print("wrote " + ", ".join(str(p) for p in paths.values()))
