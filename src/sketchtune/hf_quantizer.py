"""transformers integration: `quant_method: "sketchtune"` for `from_pretrained` / `save_pretrained`.

`AutoModelForCausalLM.from_pretrained(SKETCHED_DIR)` builds the skeleton on meta (transformers
does), this quantizer swaps every listed projection for a SketchLinear shell before any weight is
read, checks the checkpoint's headers against the skeleton (names, shapes, dtypes) so nothing is
ever silently initialised at random, and after loading recomputes the codes' fingerprint, checks
the tables are finite and leaves only `values` trainable. The dense model is never built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import SketchtuneError, corrupt_checkpoint
from .format import EXPONENT_SUFFIX, QUANT_METHOD, SketchFormatConfig, decode_int8_tables
from .layers import SketchLinear, base_fingerprint, sketched_layers

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VALUE_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class SketchtuneConfig(SketchFormatConfig, QuantizationConfigMixin):
    """The sketch format's config as transformers' quantization config (same fields)."""

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        config = super().from_dict(config_dict)
        unused = {k: v for k, v in kwargs.items() if not hasattr(config, k)}
        for key in set(kwargs) - set(unused):
            setattr(config, key, kwargs[key])
        return (config, unused) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return SketchFormatConfig.to_dict(self)


def install_shells(
    model: torch.nn.Module, config: SketchFormatConfig, values_dtype: torch.dtype
) -> None:
    """Swap each listed projection for a meta SketchLinear of the right shape (values in
    `values_dtype`: the loader casts each stored tensor to its shell's dtype; int8-encoded tables
    also get their exponents' buffer, which `decode_tables` folds in after loading)."""
    for name in config.modules:
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise SketchtuneError(f"sketched module {name} is not part of this model") from None
        if not isinstance(dense, torch.nn.Linear):
            kind = type(dense).__name__
            raise SketchtuneError(f"sketched module {name} is a {kind}, not a Linear")
        bits, gpr = config.settings_of(name)
        shell = SketchLinear(
            dense.in_features, dense.out_features, bits, gpr,
            bias=dense.bias is not None, device="meta",
        )
        shell.values.data = shell.values.data.to(values_dtype)
        if config.table_encoding_of(name) == "int8":  # the levels load as stored (no grad: int)
            shell.values = torch.nn.Parameter(shell.values.data.to(torch.int8), requires_grad=False)
            exponent = torch.zeros(dense.out_features, gpr, 1, dtype=torch.int8, device="meta")
            shell.register_buffer(EXPONENT_SUFFIX, exponent)
        model.set_submodule(name, shell)


def decode_tables(model: torch.nn.Module) -> None:
    """Int8 levels times their power-of-two exponents, as bf16 tables (exact); the exponents'
    buffers go (the model then holds tables as any other does)."""
    for layer in sketched_layers(model).values():
        exponent = layer._buffers.pop(EXPONENT_SUFFIX, None)
        if exponent is not None:
            tables = decode_int8_tables(layer.values.data, exponent, torch.bfloat16)
            layer.values = torch.nn.Parameter(tables)


def read_headers(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Checkpoint key -> (safetensors dtype, shape), from the files' headers only."""
    headers = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    part = handle.get_slice(key)
                    headers[key] = (part.get_dtype(), tuple(part.get_shape()))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise corrupt_checkpoint(file, exc) from None
    return headers


def check_checkpoint(
    model: PreTrainedModel, headers: dict, where: str, int8: set[str] = frozenset()
) -> None:
    """Every tensor the skeleton needs is stored with its shape; codes are uint8, int8-encoded
    tables and their exponents int8, the rest float."""
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - set(headers) - tied)
    unexpected = sorted(set(headers) - set(expected))
    if missing or unexpected:
        raise SketchtuneError(
            f"checkpoint {where} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for key, (dtype, shape) in headers.items():
        if shape != tuple(expected[key].shape):
            raise SketchtuneError(
                f"checkpoint tensor {key} has shape {shape}, config expects "
                f"{tuple(expected[key].shape)}"
            )
        if key.endswith(".codes") and dtype != "U8":
            raise SketchtuneError(f"checkpoint tensor {key} is {dtype}; codes must be U8")
        module = key.rpartition(".")[0]
        if key.endswith(f".{EXPONENT_SUFFIX}") or module in int8 and key.endswith(".values"):
            if dtype != "I8":
                raise SketchtuneError(f"checkpoint tensor {key} is {dtype}; int8 tables are I8")
            continue
        if key.endswith(".values") and dtype not in VALUE_DTYPES:
            raise SketchtuneError(f"checkpoint tensor {key} is {dtype}; values must be a float")
        if not key.endswith(".codes") and dtype not in VALUE_DTYPES:  # else cast silently
            raise SketchtuneError(
                f"checkpoint tensor {key} is {dtype}; weights must be {'/'.join(VALUE_DTYPES)}"
            )


def check_loaded(model: PreTrainedModel, config: SketchFormatConfig) -> None:
    """The codes are those the fingerprint names, and every table is finite."""
    layers = sketched_layers(model)
    for name, layer in layers.items():
        if not torch.isfinite(layer.values).all():
            raise SketchtuneError(f"sketched layer {name} has non-finite values (NaN or inf)")
    if config.fingerprint is not None and base_fingerprint(model) != config.fingerprint:
        raise SketchtuneError(
            "the stored codes do not match the fingerprint in config.json "
            f"({config.fingerprint}): a damaged or edited folder"
        )


class SketchtuneHfQuantizer(HfQuantizer):
    """Loads pre-sketched folders; sketching itself is `sketchtune compress` (it needs data)."""

    requires_calibration = True
    quantization_config: SketchtuneConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        if not files:
            raise SketchtuneError("a sketched model loads from its safetensors files only")
        headers = read_headers(files)
        stored = {headers[f"{name}.values"][0] for name in self.quantization_config.modules
                  if f"{name}.values" in headers}
        # Tables as stored (bf16 for folders we write): lossless, and the CPU GEMV reads them
        # directly. Training promotes them to fp32 masters (SketchLinear.train).
        config = self.quantization_config
        int8 = {name for name in config.modules if config.table_encoding_of(name) == "int8"}
        stored.discard("I8")  # int8 levels: decoded to bf16 after loading (exact)
        if int8 and not stored:
            values_dtype = torch.bfloat16
        else:
            values_dtype = VALUE_DTYPES[stored.pop()] if len(stored) == 1 else torch.float32
        install_shells(model, config, values_dtype)
        where = files[0] if len(files) == 1 else f"{len(files)} shards"
        check_checkpoint(model, headers, where, int8)

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any):
        # Imported here: this module is imported while transformers itself is loading (see
        # `registration`), when our modules that import transformers cannot be imported yet.
        from .serving import serve
        from .task_sketch import attach_task_sketch_switching

        decode_tables(model)
        check_loaded(model, self.quantization_config)
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".values"))
        attach_task_sketch_switching(model)
        return serve(model)  # the fast inference path on CPU; training is unaffected

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True  # the CPU op and Triton kernels are traceable (generate --compile)

    @property
    def is_qat_trainable(self) -> bool:
        return True  # the sketch values are the trainable parameters: no adapter needed


def register() -> None:
    """Idempotent: transformers refuses a second registration of a name."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(SketchtuneConfig)
    register_quantizer(QUANT_METHOD)(SketchtuneHfQuantizer)
