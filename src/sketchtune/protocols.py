"""The paper's two comparisons as named `compare` presets, at the scale of a small model.

- commonsense: train on the rebuilt commonsense mix; log-likelihood accuracy on all eight
  commonsense test sets (1000 items each, or the whole set where smaller) and the held-out NLL
  of their gold responses (items of all eight pooled);
- math: GSM8K-train fine-tuning; held-out NLL on GSM8K test and generation accuracy on gsm8k,
  AddSub, MultiArith, SingleEq and AQuA (AQuA, having options, also by log-likelihood).

Both run dense (untuned), SketchTune at gpr 4 and gpr 1, LoRA, DoRA, QLoRA-style and LoftQ, three
seeds each at rates chosen on a validation split of the training data. Run one with

    python -m sketchtune.protocols math -o DIR [--set steps=30 --set generate_limit=20 ...]

Rerunning the same command resumes it: finished runs are kept in DIR.run/ (see `compare`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from .compare import CompareConfig
from .data.registry import COMMONSENSE, MATH, MIX

MATH_TASKS = list(MATH)
COMMONSENSE_TASKS = list(COMMONSENSE)
METHODS = ["dense", "sketch", "sketch-gpr1", "lora", "dora", "qlora", "loftq"]
_SHARED = {"methods": METHODS, "gpr": 4, "seeds": 3, "lr_grid": True, "steps": 200,
           "batch_size": 16, "seq_len": 256, "calib_samples": 32}
PRESETS = {
    "commonsense": {**_SHARED, "data": MIX, "tasks": COMMONSENSE_TASKS, "limit": 1000,
                    "heldout": ",".join(COMMONSENSE_TASKS), "nll_limit": 200,
                    "generate_limit": 0},
    "math": {**_SHARED, "data": "gsm8k", "tasks": MATH_TASKS, "limit": None,
             "heldout": "gsm8k", "nll_limit": 500, "generate_limit": 200},
}


def preset_config(name: str, model: str = "smollm2-135m", **overrides) -> CompareConfig:
    """The CompareConfig of a named protocol, with `overrides` (CompareConfig fields) on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown protocol {name!r}: choose {', '.join(PRESETS)}")
    known = {f.name for f in fields(CompareConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"not CompareConfig fields: {unknown}")
    return CompareConfig(model=model, **{**PRESETS[name], **overrides})


def _override(text: str) -> tuple[str, object]:
    """ "steps=30" -> ("steps", 30): values read as JSON, else kept as text."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv: list[str] | None = None) -> None:
    from .compare import compare

    parser = argparse.ArgumentParser(prog="python -m sketchtune.protocols",
                                     description="run a named comparison protocol")
    parser.add_argument("protocol", choices=sorted(PRESETS))
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                        metavar="FIELD=VALUE", help="a CompareConfig field (value as JSON)")
    parser.add_argument("--force", action="store_true", help="replace other settings' output")
    args = parser.parse_args(argv)
    config = preset_config(args.protocol, args.model, **dict(args.overrides))
    compare(config, args.output, force=args.force)


if __name__ == "__main__":
    main()
