"""The op table's element-wise formulas: parsing, what derivatives read, the generated docs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnnc.compiler import opdocs
from cnnc.compiler.formula import Formula, parse
from cnnc.compiler.ops import OPS
from cnnc.dsl.errors import InternalError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "language.md"
ELEMENTWISE = [op for op in OPS if OPS[op].formula is not None]


def test_every_formula_parses_and_says_what_backward_keeps():
    assert {"relu", "hardswish", "gelu", "silu", "elu", "mish"} <= set(ELEMENTWISE)
    for op in ELEMENTWISE:
        d = OPS[op]
        assert d.grad_needs == d.formula.grad_reads and d.grad_needs, op
        assert d.kind == "act" and d.torch and d.onnx, op
    assert OPS["relu"].grad_needs == {"output"}  # y > 0 tells the slope
    assert OPS["hardswish"].grad_needs == {"input"}  # its output does not: not invertible
    assert OPS["mish"].grad_needs == {"input"}  # mish dips below zero and back: not invertible either


@pytest.mark.parametrize("text,message", [
    ("x +", "does not parse"),
    ("exp(x, 2)", "`exp` takes 1 arguments"),
    ("x ** 2", "which formulas do not have"),
    ("cos(x)", "which formulas do not have"),
    ("x * beta", "reads `beta`"),
])
def test_a_bad_formula_is_an_internal_error_naming_the_op(text, message):
    with pytest.raises(InternalError, match=message):
        Formula(text, "1").bind("myop")
    with pytest.raises(InternalError, match="op `myop`"):
        Formula(text, "1").bind("myop")


def test_the_output_is_not_a_variable_of_the_forward_formula():
    with pytest.raises(InternalError, match="reads `y`"):
        parse("y * 2", (), ("x",), "op `z`")


def test_a_formula_may_read_its_parameters():
    f = Formula("where(x > 0, x, x * slope)", "where(x > 0, 1, slope)", ("slope",)).bind("leaky")
    assert f.grad.names() == {"x", "slope"} and f.grad_reads == {"input"}


def test_the_language_reference_tables_are_generated_from_the_op_table():
    text = DOCS.read_text(encoding="utf-8")
    assert opdocs.update(text) == text, "run `python -m cnnc.compiler.opdocs docs/language.md`"
    for op in ELEMENTWISE:
        assert f"| `{op}" in opdocs.activations()
    assert all(f"| `{n}` |" in opdocs.summary() for n, d in OPS.items() if d.user)


def test_derivatives_are_the_forward_formulas_slopes():
    """A check of the table itself: each derivative against central differences of its own
    forward formula, in float64, away from the kinks."""
    from cnnc.backends.numpy import elementwise as ew  # the NumPy rendering is the reference

    x = np.linspace(-7.3, 7.1, 301)
    x = x[np.min(np.abs(x[:, None] - np.array([-3.0, 0.0, 3.0, 6.0])), axis=1) > 1e-3]
    for op in ELEMENTWISE:
        params = OPS[op].formula.params
        args = tuple(float(OPS[op].attrs.model_fields[p].default) for p in params)
        h = 1e-6
        numeric = (ew.apply(op, args, x + h) - ew.apply(op, args, x - h)) / (2 * h)
        analytic = ew.grad(op, args, x, ew.apply(op, args, x), np.ones_like(x))
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8, err_msg=op)
