"""The whole analysis of one model and update: load, Hessians, ΔW, per-layer errors, summary."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ..data.tasks import calibration_source
from ..data.text import calibration_texts, token_windows
from ..errors import SketchtuneError
from .report import Budget, analyze_layers, summary_text, win_counts
from .sources import FinetuneSettings, collect_hessians, delta_source, load_subject, short_finetune
from .synthetic import synthetic_table


@dataclass
class HessianSettings:
    samples: int = 4  # calibration windows (a rank-deficient H still weighs errors correctly)
    seq_len: int = 256
    calib: str | None = None  # text file; default the shipped calibration text
    seed: int = 0


@dataclass
class AnalyzeRequest:
    model: str
    delta: str | None = None  # dense tuned model folder or task sketch folder
    short_finetune: str | None = None  # task name or .json/.jsonl file
    base: str | None = None  # dense base of a sketched MODEL
    bits: int | None = None
    gpr: int | None = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    budget: Budget = field(default_factory=Budget)
    hessian: HessianSettings = field(default_factory=HessianSettings)
    synthetic: bool = False
    data_root: str | None = None


def analyze_model(request: AnalyzeRequest, progress: bool = True) -> dict:
    """Every sketched projection's rank-r / frozen-codes / free-codes errors, with a summary."""
    if (request.delta is None) == (request.short_finetune is None):
        raise SketchtuneError("give exactly one of --delta and --short-finetune")
    timings = {}
    start = time.perf_counter()
    subject = load_subject(request.model, request.base, request.bits, request.gpr)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    finetune_info = None
    if request.delta is not None:
        delta_of, source = delta_source(subject, request.delta)
    else:
        delta_of, finetune_info = short_finetune(
            subject, request.short_finetune, request.finetune, request.data_root, progress
        )
        source = (f"{request.finetune.steps} AdamW steps of full fine-tuning on "
                  f"{request.short_finetune} (lr {request.finetune.lr})")
    timings["delta"] = time.perf_counter() - start

    start = time.perf_counter()  # the fine-tune restored the base: these Hessians are the base's
    h = request.hessian
    texts = calibration_source(h.calib) if h.calib else calibration_texts()
    windows = token_windows(subject.tokenizer, texts, h.samples, h.seq_len, h.seed)
    hessians = collect_hessians(subject.model, subject.layers, windows)
    timings["hessians"] = time.perf_counter() - start

    start = time.perf_counter()
    records = analyze_layers(subject, delta_of, hessians, request.budget, progress)
    timings["layers"] = time.perf_counter() - start
    result = {
        "title": f"{request.model}: {source}",
        "settings": asdict(request),
        "bits": subject.bits,
        "gpr": subject.gpr,
        "codes": subject.codes_origin,
        "source": source,
        "calibration_tokens": windows.numel(),
        "finetune": finetune_info,
        "summary": summary_text(records, subject, request.budget, source),
        "counts": win_counts(records),
        "layers": records,
    }
    if request.synthetic:
        start = time.perf_counter()
        result["synthetic"] = synthetic_table(bits=subject.bits, gpr=subject.gpr)
        timings["synthetic"] = time.perf_counter() - start
    result["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return result
