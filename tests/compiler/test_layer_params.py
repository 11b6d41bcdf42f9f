"""Block parameters that hold a layer or a block: `block unit(c, act=relu)`, then `-> act`."""

from __future__ import annotations

import pytest

from cnnc.compiler.pipeline import run_pipeline
from cnnc.dsl import load_text
from cnnc.dsl.errors import CnncErrors

HEADER = """\
network t
input 3x8x8
block unit(c, act=relu):
    conv c 3x3 pad=1 -> bn -> act
block stem(c):
    conv c 1x1
block stage(c, first=stem, act=relu6):
    first(c) -> unit(c, act=act) -> unit(c, act=hardswish)
layers:
"""


def ops(layers: str) -> list[str]:
    g = run_pipeline(load_text(HEADER + layers, "t.cnn"))
    return [d["op"] for _, d in sorted(g.nodes(data=True))][1:]


def test_a_parameter_may_name_a_layer_or_a_block():
    assert ops("    unit(4)\n") == ["conv", "batchnorm", "relu"]
    assert ops("    unit(4, act=gelu)\n") == ["conv", "batchnorm", "gelu"]
    assert ops("    stage(4, act=silu)\n") == ["conv", "conv", "batchnorm", "silu", "conv", "batchnorm", "hardswish"]
    assert ops("    stage(4, first=unit)\n")[:3] == ["conv", "batchnorm", "relu"]
    assert ops("    unit(4, act=leaky_relu)\n")[-1] == "leaky_relu"


def test_a_parameter_that_is_no_layer_is_a_located_error_with_a_suggestion():
    with pytest.raises(CnncErrors) as info:
        ops("    unit(4, act=hardswsh)\n")
    err = info.value.errors[0]
    assert "`act` is `hardswsh` here, which is not a layer or block" in err.message
    assert (err.span.line, err.span.col) == (4, 31) and "hardswish" in (err.hint or "")
    assert any("in block `unit`, called here" in n.message for n in err.notes)
