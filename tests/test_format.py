import pytest
import torch

from sketchtune.format import (
    FormatError,
    SketchedWeight,
    bytes_per_unit,
    check_shape,
    codes_per_unit,
    dequantize,
    pack_codes,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (7, 24), (64, 576), (5, 1536)])
def test_pack_round_trip(bits, shape):
    g = torch.Generator().manual_seed(sum(shape) * bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], shape[1] * bits // 8)  # true width: bits/8 byte per code
    assert torch.equal(unpack_codes(packed, bits, shape[1]), codes)


def test_pack_layout_is_little_endian():
    # 4 bits: first code in the low nibble.
    assert pack_codes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    # 2 bits: four codes per byte, first lowest.
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3 bits: 8 codes in 3 bytes; code i occupies bits [3i, 3i+3) of a little-endian 24-bit word.
    codes = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]])
    word = 7 | (5 << 21)
    assert pack_codes(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_units():
    assert (codes_per_unit(4), bytes_per_unit(4)) == (2, 1)
    assert (codes_per_unit(2), bytes_per_unit(2)) == (4, 1)
    assert (codes_per_unit(3), bytes_per_unit(3)) == (8, 3)


@pytest.mark.parametrize("gpr", [1, 2, 4, 8])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_matches_definition(bits, gpr):
    d_out, d_in = 5, 48
    g = torch.Generator().manual_seed(gpr * 10 + bits)
    codes = torch.randint(0, 1 << bits, (d_out, d_in), generator=g)
    values = torch.randn(d_out, gpr, 1 << bits, generator=g)
    w = dequantize(codes, values)
    group = d_in // gpr
    for r in range(d_out):
        for c in range(d_in):
            assert w[r, c] == values[r, c // group, codes[r, c]]
    sketch = SketchedWeight.from_codes(codes, values, bits)
    assert torch.equal(sketch.dequantize(), w)


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(FormatError, match="not divisible by gpr"):
        check_shape(20, 4, 8)
    with pytest.raises(FormatError, match="packing unit"):
        check_shape(12, 3, 4)
    with pytest.raises(FormatError, match="bits must be"):
        check_shape(16, 5, 1)
    with pytest.raises(FormatError, match="gpr"):
        check_shape(16, 4, 3)
    with pytest.raises(FormatError, match="out of range"):
        pack_codes(torch.tensor([[16, 0]]), 4)
    with pytest.raises(FormatError, match="do not hold"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)


def test_layer_losses_round_trip_and_older_folders_have_none():
    from sketchtune.format import FORMAT_VERSION, SketchFormatConfig

    config = SketchFormatConfig(4, 2, ["a.q"], layer_losses={"a.q": 0.5})
    again = SketchFormatConfig.from_dict(config.to_dict())
    assert again.layer_losses == {"a.q": 0.5} and again.format_version == FORMAT_VERSION == 4
    version3 = {k: v for k, v in config.to_dict().items()
                if k not in ("table_encoding", "module_settings")}
    version3["format_version"] = 3  # before int8 tables and per-projection settings
    read = SketchFormatConfig.from_dict(version3)
    assert read.table_encoding_of("a.q") == "float" and read.settings_of("a.q") == (4, 2)
    old = config.to_dict()
    del old["layer_losses"]
    old["format_version"] = 2
    assert SketchFormatConfig.from_dict(old).layer_losses == {}
    with pytest.raises(FormatError, match="layer_losses"):
        SketchFormatConfig.from_dict({**config.to_dict(), "layer_losses": {"a.q": "big"}})
