"""The sketch format: the one place that knows how codes are packed into bytes.

A sketched weight of shape (d_out, d_in) is stored as
  codes:  uint8, shape (d_out, d_in * bits // 8): `bits`-wide indices packed little-endian, the
          first code of a packing unit in the lowest bits. A packing unit is the smallest run of
          codes that fills whole bytes: 2 codes per byte at 4 bits, 4 at 2 bits, 8 codes in 3 bytes
          at 3 bits.
  values: shape (d_out, gpr, 2**bits): the table of each (row, group); group g covers the columns
          [g * d_in / gpr, (g + 1) * d_in / gpr).
Reconstruction: W[r, c] = values[r, c // (d_in / gpr), codes[r, c]].

A sketched folder's `quantization_config` is a `SketchFormatConfig`: it names the format version
and the packing above, so a reader refuses a layout it does not know instead of misreading it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch

from .errors import SketchtuneError

SUPPORTED_BITS = (2, 3, 4)
SUPPORTED_GPR = (1, 2, 4, 8)

QUANT_METHOD = "sketchtune"
# 1: folders written before the version was recorded (same layout as 2, no format_version key).
# 2: format_version, packing and dense_projections recorded.
# 3: layer_losses recorded (same tensors as 1 and 2).
# 4: table_encoding ("int8": `<module>.values` stored as int8 levels beside
#    `<module>.values_exponent`, see `encode_int8_tables`) and module_settings (bits and gpr of
#    the projections that differ from the folder's own, as `sketchtune mix` writes).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
# Task sketches (task_sketch.py) are versioned on their own: their layout has not changed since 2.
TASK_SKETCH_VERSION = 2
TASK_SKETCH_READABLE_VERSIONS = (1, 2)
PACKING = "lsb-first"  # the first code of a packing unit in the lowest bits (see pack_codes)
STORAGE_DTYPES = ("bfloat16", "float16", "float32")
TABLE_ENCODINGS = ("float", "int8")  # tables in storage_dtype, or int8 levels (version 4)
EXPONENT_SUFFIX = "values_exponent"  # the int8 encoding's second tensor per sketched module
INT8_LEVEL = 127


class FormatError(SketchtuneError, ValueError):
    """A shape or setting that the sketch format cannot represent."""


def codes_per_unit(bits: int) -> int:
    """Number of codes in the smallest run that fills whole bytes."""
    return 8 // math.gcd(bits, 8)


def bytes_per_unit(bits: int) -> int:
    return bits * codes_per_unit(bits) // 8


def check_settings(bits: int, gpr: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise FormatError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if gpr not in SUPPORTED_GPR:
        raise FormatError(f"groups per row (gpr) must be one of {SUPPORTED_GPR}, got {gpr}")


def _unit_message(d_in: int, bits: int) -> str:
    unit = codes_per_unit(bits)
    return f"input size {d_in} is not divisible by the {bits}-bit packing unit {unit}"


def check_shape(d_in: int, bits: int, gpr: int) -> None:
    """Raise FormatError unless a row of d_in weights can be split into gpr groups and packed."""
    check_settings(bits, gpr)
    if d_in % gpr:
        raise FormatError(f"input size {d_in} is not divisible by gpr={gpr}")
    unit = codes_per_unit(bits)
    if d_in % unit:
        raise FormatError(_unit_message(d_in, bits))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(d_out, d_in) integer codes in [0, 2**bits) -> (d_out, d_in * bits // 8) uint8."""
    d_out, d_in = codes.shape
    unit, nbytes = codes_per_unit(bits), bytes_per_unit(bits)
    if d_in % unit:
        raise FormatError(_unit_message(d_in, bits))
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise FormatError(f"codes out of range for {bits} bits")
    units = codes.to(torch.int64).reshape(d_out, d_in // unit, unit)
    shifts = torch.arange(unit, device=codes.device, dtype=torch.int64) * bits
    words = (units << shifts).sum(-1, keepdim=True)  # (d_out, n_units, 1), at most 24 bits used
    byte_shifts = torch.arange(nbytes, device=codes.device, dtype=torch.int64) * 8
    packed = (words >> byte_shifts) & 0xFF  # (d_out, n_units, nbytes)
    return packed.to(torch.uint8).reshape(d_out, d_in * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """(d_out, d_in * bits // 8) uint8 -> (d_out, d_in) uint8 codes."""
    d_out = packed.shape[0]
    unit, nbytes = codes_per_unit(bits), bytes_per_unit(bits)
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 != d_in * bits or d_in % unit:
        raise FormatError(
            f"packed codes of shape {tuple(packed.shape)} ({packed.dtype}) do not hold "
            f"{d_in} {bits}-bit codes per row"
        )
    units = packed.to(torch.int64).reshape(d_out, d_in // unit, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    words = (units << byte_shifts).sum(-1, keepdim=True)  # (d_out, n_units, 1)
    shifts = torch.arange(unit, device=packed.device, dtype=torch.int64) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)  # (d_out, n_units, unit)
    return codes.to(torch.uint8).reshape(d_out, d_in)


def dequantize(codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Unpacked (d_out, d_in) codes and (d_out, gpr, K) values -> dense (d_out, d_in) weight."""
    d_out, d_in = codes.shape
    gpr = values.shape[1]
    grouped = codes.reshape(d_out, gpr, d_in // gpr).to(torch.int64)
    return torch.gather(values, 2, grouped).reshape(d_out, d_in)


def encode_int8_tables(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) tables -> int8 levels (..., K) and one power-of-two exponent per table (..., 1),
    table ≈ level * 2**exponent, the exponent the smallest that keeps |level| <= 127.

    8 + 8/K bits per entry instead of 16, and exact in bf16 (a level needs 7 significant bits,
    bf16 holds 8), so the tables run as stored on the bf16 fast path."""
    absmax = values.detach().abs().amax(-1, keepdim=True).float()
    exponent = torch.ceil(torch.log2(absmax / INT8_LEVEL)).clamp(-100, 100)  # 0 -> -inf -> -100
    exponent += (absmax / torch.exp2(exponent) > INT8_LEVEL).float()  # log2's rounding
    levels = (values.detach().float() / torch.exp2(exponent)).round().clamp(-INT8_LEVEL, INT8_LEVEL)
    return levels.to(torch.int8), exponent.to(torch.int8)


def decode_int8_tables(
    levels: torch.Tensor, exponent: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The tables `encode_int8_tables` encoded, in `dtype` (exact in bf16, fp16 and fp32)."""
    return (levels.float() * torch.exp2(exponent.float())).to(dtype)


def round_int8_tables(values: torch.Tensor) -> torch.Tensor:
    """The tables as the int8 encoding stores them, in their own dtype."""
    return decode_int8_tables(*encode_int8_tables(values), values.dtype)


def stored_bits(d_out: int, d_in: int, bits: int, gpr: int, table_encoding: str) -> int:
    """Bits one sketched (d_out, d_in) weight takes on disk: its codes and its tables (bf16
    entries, or int8 entries plus an int8 exponent per table)."""
    entries = d_out * gpr * (1 << bits)
    tables = 16 * entries if table_encoding == "float" else 8 * entries + 8 * d_out * gpr
    return d_out * d_in * bits + tables


@dataclass
class SketchedWeight:
    """A weight matrix in sketch form: packed codes plus the per-(row, group) value tables."""

    codes: torch.Tensor  # (d_out, d_in * bits // 8) uint8
    values: torch.Tensor  # (d_out, gpr, 2**bits)
    bits: int
    in_features: int

    @classmethod
    def from_codes(cls, codes: torch.Tensor, values: torch.Tensor, bits: int) -> SketchedWeight:
        d_out, d_in = codes.shape
        check_shape(d_in, bits, values.shape[1])
        if values.shape[0] != d_out or values.shape[2] != 1 << bits:
            raise FormatError(
                f"values of shape {tuple(values.shape)} do not match codes of shape "
                f"{(d_out, d_in)} at {bits} bits"
            )
        return cls(pack_codes(codes, bits), values, bits, d_in)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def gpr(self) -> int:
        return self.values.shape[1]

    def unpacked_codes(self) -> torch.Tensor:
        return unpack_codes(self.codes, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.unpacked_codes(), self.values)


@dataclass
class SketchFormatConfig:
    """What a sketched folder's `quantization_config` holds: the one definition of its fields.

    `modules`: the sketched projections (names relative to the model); `dense_projections`: the
    block projections whose shapes the settings could not sketch, left dense; `fingerprint`:
    `hub.base_fingerprint` of the codes; `learning`: the `SketchConfig` that learned them;
    `layer_losses`: each sketched projection's error-compensation loss (`learn.LayerSketch`),
    empty for plain k-means and for folders written before version 3. `table_encoding`: how
    `values` are stored (TABLE_ENCODINGS); `module_settings`: {module: {"bits", "groups_per_row",
    "table_encoding"}} for projections stored otherwise than the folder's own (version 4).
    """

    bits: int
    groups_per_row: int
    modules: list[str]
    fingerprint: str | None = None
    storage_dtype: str = "bfloat16"
    dense_projections: list[str] = field(default_factory=list)
    learning: dict = field(default_factory=dict)
    layer_losses: dict[str, float] = field(default_factory=dict)
    table_encoding: str = "float"
    module_settings: dict[str, dict] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    packing: str = PACKING
    quant_method: str = QUANT_METHOD

    def to_dict(self) -> dict:
        return asdict(self)

    def settings_of(self, module: str) -> tuple[int, int]:
        """(bits, groups per row) of one sketched module."""
        own = self.module_settings.get(module, {})
        return own.get("bits", self.bits), own.get("groups_per_row", self.groups_per_row)

    def table_encoding_of(self, module: str) -> str:
        return self.module_settings.get(module, {}).get("table_encoding", self.table_encoding)

    @classmethod
    def from_dict(cls, raw: object) -> SketchFormatConfig:
        """Validate a stored config: one FormatError line for anything this reader cannot use."""
        if not isinstance(raw, dict):
            raise FormatError(f"quantization_config must be an object, got {type(raw).__name__}")
        if raw.get("quant_method") != QUANT_METHOD:
            method = raw.get("quant_method")
            raise FormatError(f"quantization_config is not sketchtune's: {method!r}")
        version = raw.get("format_version", 1)
        if version not in READABLE_VERSIONS:
            raise FormatError(
                f"sketch format version {version!r} is not readable by this sketchtune "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}): upgrade sketchtune"
            )
        packing = raw.get("packing", PACKING)
        if packing != PACKING:
            raise FormatError(f"unknown code packing {packing!r} (this reader knows {PACKING!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FormatError(f"quantization_config has unknown keys {unknown}")
        missing = [name for name in ("bits", "groups_per_row", "modules") if name not in raw]
        if missing:
            raise FormatError(f"quantization_config lacks {missing}")
        config = cls(**{**raw, "format_version": FORMAT_VERSION, "packing": PACKING})
        config._check_types()
        return config

    def _check_types(self) -> None:
        for name in ("bits", "groups_per_row"):
            value = getattr(self, name)
            if type(value) is not int:
                raise FormatError(f"quantization_config {name} must be an integer, got {value!r}")
        check_settings(self.bits, self.groups_per_row)
        for name in ("modules", "dense_projections"):
            names = getattr(self, name)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise FormatError(f"quantization_config {name} must be a list of module names")
        if not self.modules:
            raise FormatError("quantization_config lists no sketched modules")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise FormatError("quantization_config fingerprint must be a string")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise FormatError(
                f"quantization_config storage_dtype {self.storage_dtype!r} is not one of "
                f"{STORAGE_DTYPES}"
            )
        if self.table_encoding not in TABLE_ENCODINGS:
            raise FormatError(
                f"quantization_config table_encoding {self.table_encoding!r} is not one of "
                f"{TABLE_ENCODINGS}"
            )
        self._check_module_settings()
        if not isinstance(self.learning, dict):
            raise FormatError("quantization_config learning must be an object")
        losses = self.layer_losses
        if not isinstance(losses, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) for k, v in losses.items()
        ):
            raise FormatError("quantization_config layer_losses must map module names to numbers")

    def _check_module_settings(self) -> None:
        settings = self.module_settings
        if not isinstance(settings, dict) or not all(
            isinstance(own, dict) for own in settings.values()
        ):
            raise FormatError("quantization_config module_settings must map names to objects")
        strangers = sorted(set(settings) - set(self.modules))
        if strangers:
            raise FormatError(f"quantization_config module_settings names {strangers[:3]}, "
                              "which are not sketched modules")
        for name, own in settings.items():
            numbers = [own[key] for key in ("bits", "groups_per_row") if key in own]
            if set(own) - {"bits", "groups_per_row", "table_encoding"} or not all(
                type(number) is int for number in numbers
            ) or self.table_encoding_of(name) not in TABLE_ENCODINGS:
                raise FormatError(
                    f"quantization_config module_settings[{name!r}] may hold integer bits and "
                    f"groups_per_row and a table_encoding of {TABLE_ENCODINGS}"
                )
            check_settings(*self.settings_of(name))
