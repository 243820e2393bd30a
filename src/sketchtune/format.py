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
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# Task sketches (task_sketch.py) are versioned on their own: their layout has not changed since 2.
TASK_SKETCH_VERSION = 2
TASK_SKETCH_READABLE_VERSIONS = (1, 2)
PACKING = "lsb-first"  # the first code of a packing unit in the lowest bits (see pack_codes)
STORAGE_DTYPES = ("bfloat16", "float16", "float32")


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
    empty for plain k-means and for folders written before version 3.
    """

    bits: int
    groups_per_row: int
    modules: list[str]
    fingerprint: str | None = None
    storage_dtype: str = "bfloat16"
    dense_projections: list[str] = field(default_factory=list)
    learning: dict = field(default_factory=dict)
    layer_losses: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    packing: str = PACKING
    quant_method: str = QUANT_METHOD

    def to_dict(self) -> dict:
        return asdict(self)

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
        if not isinstance(self.learning, dict):
            raise FormatError("quantization_config learning must be an object")
        losses = self.layer_losses
        if not isinstance(losses, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) for k, v in losses.items()
        ):
            raise FormatError("quantization_config layer_losses must map module names to numbers")
