"""Dense source weights read one decoder block at a time, so compression never holds the whole
dense model: the skeleton is built on meta, the parts outside the blocks are read up front, and
each block's tensors are read from the source safetensors just before it is sketched.

Sources this cannot stream (no safetensors, names that need transformers' conversions) return
None from `open_streaming`, and callers load the dense model whole as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .compression import find_decoder_blocks
from .errors import SketchtuneError, corrupt_checkpoint
from .hub import INDEX_NAME, WEIGHTS_NAME, checkpoint_files
from .memory import release_free_heap


class SafetensorsCheckpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.file_of = {key: file for file in checkpoint_files(folder) for key in self._keys(file)}

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(file, framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise corrupt_checkpoint(file, exc) from None

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        tensors = {}
        for file, names in by_file.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in names:
                        # A copy: tensors viewing the file's mapping would keep every page read
                        # so far resident, i.e. the whole dense model by the last block.
                        tensors[name] = handle.get_tensor(name).clone()
            except Exception as exc:
                raise corrupt_checkpoint(file, exc) from None
        return tensors


class StreamingSource:
    """A meta skeleton of the source model that fills itself from its checkpoint on request."""

    def __init__(
        self, model: PreTrainedModel, checkpoint: SafetensorsCheckpoint,
        key_of: dict[str, str], dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.key_of = key_of  # model state name -> checkpoint key
        self.dtype = dtype
        self.blocks_name, _ = find_decoder_blocks(model)

    def load_outside_blocks(self, dtype: torch.dtype | None = None) -> None:
        """Embeddings, final norm, head: everything the blocks do not hold, in `dtype` (default:
        the source's skeleton dtype)."""
        self._load(self._outside_names(), dtype)
        self.model.tie_weights()

    def release_outside_blocks(self) -> None:
        """Put the parts outside the blocks back on meta (tied ones included) and hand their
        memory back: once the first block's inputs are captured, compression needs none of them
        (the embeddings of a 128k vocabulary are 1 GB in fp32 at 2048 wide) until the save."""
        read = set(self._outside_names())
        outside = {
            name: torch.empty_like(tensor, device="meta")
            for name, tensor in self.model.state_dict(keep_vars=True).items()
            if name in read or is_tied_output(self.model, name)
        }
        self.model.load_state_dict(outside, strict=False, assign=True)
        release_free_heap()

    def load_block(self, index: int) -> None:
        """Fill decoder block `index` (`compress_model` calls this as its `before_block`)."""
        prefix = f"{self.blocks_name}.{index}."
        release_free_heap()  # the previous block's dense weights and activations
        self._load([n for n in self.key_of if n.startswith(prefix)])

    def _outside_names(self) -> list[str]:
        """The checkpoint-backed state names outside the decoder blocks."""
        prefix = f"{self.blocks_name}."
        return [n for n in self.key_of if not n.startswith(prefix)]

    def check_complete(self) -> None:
        state = list(self.model.named_parameters()) + list(self.model.named_buffers())
        left = [name for name, tensor in state if tensor.is_meta]
        if left:
            raise SketchtuneError(f"{self.checkpoint.folder} leaves {left[:3]} unset")

    def _load(self, names: list[str], dtype: torch.dtype | None = None) -> None:
        dtype = dtype or self.dtype
        stored = self.checkpoint.read([self.key_of[n] for n in names])
        expected = self.model.state_dict()
        state = {}
        for name in names:
            tensor = stored[self.key_of[name]]
            if tensor.shape != expected[name].shape:
                raise SketchtuneError(
                    f"checkpoint tensor {self.key_of[name]} has shape {tuple(tensor.shape)}, "
                    f"its config expects {tuple(expected[name].shape)}"
                )
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        self.model.load_state_dict(state, strict=False, assign=True)


def open_streaming(
    folder: str | Path, dtype: torch.dtype = torch.float32
) -> StreamingSource | None:
    """A streaming view of the dense model in `folder`, or None if it cannot be streamed."""
    folder = Path(folder)
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / INDEX_NAME).is_file()):
        return None
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None):
        return None  # a quantized source needs transformers' own loader
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    checkpoint = SafetensorsCheckpoint(folder)
    key_of = _match_names(model, set(checkpoint.file_of))
    if key_of is None:
        return None
    return StreamingSource(model.eval(), checkpoint, key_of, dtype)


def _match_names(model: PreTrainedModel, keys: set[str]) -> dict[str, str] | None:
    """Model state name -> checkpoint key, allowing for the base-model prefix being present in
    one and absent in the other; None if some non-tied tensor has no key (a checkpoint that
    needs renaming or fusing, which transformers' loader knows how to do and we do not)."""
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    key_of = {}
    for name in model.state_dict():
        for key in (name, name.removeprefix(prefix), prefix + name):
            if key in keys:
                key_of[name] = key
                break
        else:
            if not is_tied_output(model, name):
                return None
    return key_of


def is_tied_output(model: PreTrainedModel, name: str) -> bool:
    """True for the output embedding when the config ties it to the input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    output = model.get_output_embeddings()
    return output is not None and any(
        candidate is output.weight and key == name
        for key, candidate in model.named_parameters(remove_duplicate=False)
    )
