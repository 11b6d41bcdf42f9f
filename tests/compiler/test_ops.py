"""Op table shape rules, parameter counts and MACs, against hand arithmetic (PyTorch's formulas)."""

from __future__ import annotations

import pytest

from cnnc.compiler.ops import OPS, Slide, lookup, resolve_pads
from cnnc.dsl.errors import CnncError


def shape(op, ins, **attrs):
    return OPS[op].shape(OPS[op].attrs(**attrs), ins)


def test_conv_output_size_formula():
    # (N − F + 2P)/S + 1 from the seed: 32x32, 5x5, stride 1 → 28; stride 3 → 10
    assert shape("conv", [(3, 32, 32)], filters=6, kernel=5) == (6, 28, 28)
    assert shape("conv", [(3, 32, 32)], filters=6, kernel=5, stride=3) == (6, 10, 10)
    assert shape("conv", [(3, 32, 32)], filters=6, kernel=3, pad=1) == (6, 32, 32)


def test_conv_non_square_kernel_and_asymmetric_pad():
    assert shape("conv", [(8, 17, 17)], filters=8, kernel=(1, 7), pad=(0, 0, 3, 3)) == (8, 17, 17)
    assert shape("conv", [(8, 10, 10)], filters=4, kernel=3, pad=(1, 0, 2, 0)) == (4, 9, 10)


def test_conv_dilation_uses_effective_kernel():
    # F_eff = d·(k−1)+1 = 5 for a 3x3 with dilation 2
    assert shape("conv", [(4, 32, 32)], filters=4, kernel=3, dilation=2) == (4, 28, 28)
    with pytest.raises(CnncError, match=r"F = 2·\(3−1\)\+1 = 5"):
        shape("conv", [(4, 32, 32)], filters=4, kernel=3, dilation=2, stride=2)


def test_pad_same_matches_tensorflow():
    # TF SAME: out = ceil(N/S); total pad = max((out−1)·S + F − N, 0), extra at the end
    assert resolve_pads("same", 224, 224, (7, 7), (2, 2)) == (2, 3, 2, 3)
    assert resolve_pads("same", 5, 5, (3, 3), (1, 1)) == (1, 1, 1, 1)
    assert resolve_pads("same", 8, 8, (1, 1), (2, 2)) == (0, 0, 0, 0)
    assert shape("conv", [(3, 224, 224)], filters=8, kernel=7, stride=2, pad="same") == (8, 112, 112)
    assert shape("conv", [(3, 15, 15)], filters=8, kernel=3, stride=2, pad="same") == (8, 8, 8)


def test_rounding_modes():
    assert Slide(32, 5, 2, 0, 0, "floor").size("w", "conv") == 14
    assert Slide(32, 5, 2, 0, 0, "ceil").size("w", "conv") == 15
    with pytest.raises(CnncError, match="not an integer"):
        Slide(32, 5, 2, 0, 0, "exact").size("w", "conv")


def test_ceil_pooling_drops_a_window_starting_in_the_padding():
    # PyTorch MaxPool2d(3, 2, padding=1, ceil_mode=True) on 6: ceil((6+2−3)/2)+1 = 4, last window
    # would start at 3·2 = 6 ≥ 6 + 1? no → 4 stays; on 5 with pad 1: ceil(4/2)+1 = 3 and start 4 < 6 → 3
    assert shape("maxpool", [(1, 6, 6)], kernel=3, stride=2, pad=1, round="ceil") == (1, 4, 4)
    # kernel 2 stride 2 pad 1 on 4: ceil(4/2)+1 = 3; last start (3−1)·2 = 4 ≥ 4+1? no → 3
    assert shape("maxpool", [(1, 4, 4)], kernel=2, stride=2, pad=1, round="ceil") == (1, 3, 3)
    # kernel 3 stride 3 pad 1 on 5: ceil((5+2−3)/3)+1 = 3, last start 6 ≥ 5+1 → dropped → 2
    assert shape("maxpool", [(1, 5, 5)], kernel=3, stride=3, pad=1, round="ceil") == (1, 2, 2)
    # GoogLeNet (torchvision): 112 → maxpool 3x3/2 ceil → 56
    assert shape("maxpool", [(64, 112, 112)], kernel=3, stride=2, round="ceil") == (64, 56, 56)


def test_pool_stride_defaults_to_kernel():
    assert shape("avgpool", [(6, 28, 28)], kernel=2) == (6, 14, 14)


def test_pool_pad_more_than_half_kernel():
    with pytest.raises(CnncError, match="more than half the kernel"):
        shape("maxpool", [(1, 8, 8)], kernel=2, pad=2)


def test_dense_flattens_c11_only():
    assert shape("dense", [(512, 1, 1)], units=10) == (10,)
    assert shape("dense", [(84,)], units=10) == (10,)
    with pytest.raises(CnncError, match="flattening is not implied"):
        shape("dense", [(16, 5, 5)], units=120)


def test_concat_and_add():
    assert shape("concat", [(64, 28, 28), (128, 28, 28), (32, 28, 28)]) == (224, 28, 28)
    assert shape("concat", [(10,), (20,)]) == (30,)
    assert shape("add", [(8, 4, 4), (8, 4, 4), (8, 4, 4)]) == (8, 4, 4)
    with pytest.raises(CnncError):
        shape("add", [(8, 4, 4), (8, 2, 2)])


def test_parameter_counts():
    conv = OPS["conv"]
    a = conv.attrs(filters=64, kernel=3)
    assert sum(p.shape[0] * (p.shape[1] * p.shape[2] * p.shape[3] if len(p.shape) == 4 else 1)
               for p in conv.params(a, [(32, 8, 8)])) == 64 * 32 * 9 + 64
    g = conv.attrs(filters=64, kernel=3, groups=32, bias=False)
    assert [p.shape for p in conv.params(g, [(32, 8, 8)])] == [(64, 1, 3, 3)]
    bn = OPS["batchnorm"].params(OPS["batchnorm"].attrs(), [(16, 4, 4)])
    assert [(p.name, p.buffer) for p in bn] == [("weight", False), ("bias", False), ("running_mean", True),
                                                ("running_var", True)]


def test_macs():
    conv = OPS["conv"]
    a = conv.attrs(filters=64, kernel=7, stride=2, pad=3, round="floor")
    out = conv.shape(a, [(3, 224, 224)])
    assert out == (64, 112, 112)
    assert conv.macs(a, [(3, 224, 224)], out) == 64 * 112 * 112 * 7 * 7 * 3  # 118,013,952
    dense = OPS["dense"]
    assert dense.macs(dense.attrs(units=1000), [(2048, 1, 1)], (1000,)) == 2_048_000


def test_aliases_resolve():
    assert lookup("bn").name == "batchnorm"
    assert lookup("fc").name == "dense"
    assert lookup("gap").name == "globalavgpool"
    assert lookup("input") is None  # not writable in a .cnn file


def test_every_op_declares_a_fusion_pattern_and_a_schema():
    for op in OPS.values():
        assert op.pattern is not None
        assert "name" in op.attrs.model_fields
        assert op.doc
