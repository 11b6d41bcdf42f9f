"""Every user mistake is a located error: `file:line:col: error: message`, the source line, a caret,
exit code 1, and no Python traceback. Each case feeds a bad file through the command line."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, run_process

HEADER = "network t\ninput 3x32x32\nclasses 10\n"


def check_bad(cnn, body: str, line: int, col: int, *fragments: str, header: str = HEADER):
    path = cnn(header + body)
    r = run_cli("check", str(path))
    assert r.code == 1, r.err
    assert "Traceback" not in r.err
    file, got_line, got_col, message = r.first_error()
    assert file == str(path)
    assert (got_line, got_col) == (line, col), r.err
    for frag in fragments:
        assert frag in r.err, f"{frag!r} not in:\n{r.err}"
    # the source line and a caret under the column
    src_line = (header + body).splitlines()[line - 1]
    assert src_line in r.err
    caret_line = r.err.split(src_line, 1)[1].splitlines()[1]
    assert caret_line.index("^") - caret_line.index("|") - 2 == col - 1
    return r


def test_syntax_error_says_what_was_expected(cnn):
    check_bad(cnn, "layers:\n    conv 64 3x3 stride=\n", 5, 24, "syntax error", "expected", "a number")


def test_syntax_error_unbalanced_paren(cnn):
    check_bad(cnn, "layers:\n    conv 64 3x3 -> add(in\n", 5, 26, "syntax error", "`)`")


def test_bad_indentation(cnn):
    check_bad(cnn, "layers:\n    conv 64 3x3\n      relu\n", 6, 7, "syntax error")


def test_unknown_layer_did_you_mean(cnn):
    check_bad(cnn, "layers:\n    conv 8 3x3 -> rleu\n", 5, 19, "unknown layer", "`rleu`", "did you mean `relu`")


def test_unknown_attribute_did_you_mean(cnn):
    check_bad(cnn, "layers:\n    conv 8 3x3 strides=2\n", 5, 16, "unknown attribute `strides` for `conv`",
              "did you mean `stride`")


def test_wrong_argument_type(cnn):
    check_bad(cnn, "layers:\n    conv 8 3x3 stride=same\n", 5, 16, "wrong argument type", "`stride` of `conv`",
              "got same")


def test_wrong_argument_type_float_filters(cnn):
    check_bad(cnn, "layers:\n    conv 8.5 3x3\n", 5, 10, "wrong argument type", "`filters`")


def test_undefined_name_in_argument(cnn):
    check_bad(cnn, "block b(width):\n    conv widht 3x3\nlayers:\n    b(8)\n", 5, 10, "`widht` is not defined",
              "did you mean `width`", "in block `b`, called here")


def test_unknown_tensor_name(cnn):
    body = ("layers:\n    short = conv 8 1x1\n    conv 8 1x1 -> add(shrot)\n")
    check_bad(cnn, body, 6, 23, "unknown tensor `shrot`", "did you mean `short`")


def test_block_missing_argument(cnn):
    body = "block unit(c, stride):\n    conv c 3x3 stride=stride pad=1\nlayers:\n    unit(8)\n"
    check_bad(cnn, body, 7, 5, "block `unit` called without argument `stride`", "parameter declared here")


def test_block_unknown_argument(cnn):
    body = "block unit(c, stride=1):\n    conv c 3x3 stride=stride pad=1\nlayers:\n    unit(8, strid=2)\n"
    check_bad(cnn, body, 7, 13, "block `unit` has no parameter `strid`", "did you mean `stride`")


def test_block_too_many_arguments(cnn):
    body = "block unit(c):\n    conv c 3x3 pad=1\nlayers:\n    unit(8, 2)\n"
    check_bad(cnn, body, 7, 13, "takes 1 argument(s), got 2")


def test_recursion_in_blocks(cnn):
    body = "block a(c):\n    b(c)\nblock b(c):\n    a(c)\nlayers:\n    a(4)\n"
    r = check_bad(cnn, body, 7, 5, "recursive block: a → b → a")
    assert "in block `a`, called here" in r.err


def test_conv_output_not_integer_shows_arithmetic(cnn):
    # The seed's example: a 32-wide input, 5x5 filter, stride 2.
    r = check_bad(cnn, "layers:\n    conv 6 5x5 stride=2\n", 5, 5,
                  "conv output height is not an integer: (32 − 5 + 2·0)/2 + 1 = 14.5")
    assert "stride 1 or 3" in r.err and "pad=same" in r.err and "round=floor" in r.err


def test_pool_output_not_integer(cnn):
    check_bad(cnn, "layers:\n    conv 8 3x3 pad=1 -> maxpool 3x3 stride=2\n", 5, 25,
              "maxpool output height is not an integer: (32 − 3 + 2·0)/2 + 1 = 15.5")


def test_explicit_rounding_accepts_it(cnn):
    path = cnn(HEADER + "layers:\n    conv 6 5x5 stride=2 round=floor -> maxpool 3x3 stride=2 round=ceil\n")
    r = run_cli("check", str(path), "--json")
    assert r.code == 0, r.err
    shapes = [layer["shape"] for layer in json.loads(r.out)["layers"]]
    assert shapes[1:] == [[6, 14, 14], [6, 7, 7]]


def test_size_shrinks_to_zero(cnn):
    chain = " -> ".join(["conv 8 3x3 stride=2 pad=same"] * 5) + " -> conv 8 5x5"
    r = check_bad(cnn, f"layers:\n    {chain}\n", 5, 5 + chain.index("conv 8 5x5"), "would be zero or less",
                  "(1 − 5 + 2·0)/1 + 1")
    assert "smaller than the kernel" in r.err


def test_add_of_different_shapes_names_both_operands(cnn):
    body = "layers:\n    a = conv 16 3x3 pad=1\n    b = in -> conv 8 3x3 pad=1\n    add(a, b)\n"
    r = check_bad(cnn, body, 7, 5, "add of tensors with different shapes: 16×32×32 and 8×32×32")
    assert "net.cnn:5:9: note: operand 1 `conv1` has shape 16×32×32" in r.err
    assert "net.cnn:6:15: note: operand 2 `conv2` has shape 8×32×32" in r.err


def test_concat_of_different_sizes_names_both_operands(cnn):
    body = "layers:\n    a = conv 8 3x3 pad=1\n    b = in -> conv 8 3x3\n    concat(a, b)\n"
    r = check_bad(cnn, body, 7, 5, "concat of tensors with different heights/widths: 8×32×32 and 8×30×30")
    assert ":5:9: note: operand 1" in r.err and ":6:15: note: operand 2" in r.err


def test_dense_after_spatial_tensor(cnn):
    r = check_bad(cnn, "layers:\n    conv 8 3x3 pad=1 -> dense 10\n", 5, 25,
                  "dense after a spatial tensor 8×32×32: flattening is not implied")
    assert "insert `flatten`" in r.err and "8192 features" in r.err


def test_groups_not_dividing_channels(cnn):
    check_bad(cnn, "layers:\n    conv 8 3x3 groups=2\n", 5, 5, "conv groups=2 does not divide the 3 input channels")


def test_unknown_optimizer(cnn):
    check_bad(cnn, "layers:\n    gap -> dense classes\ntrain:\n    optimizer adamm\n", 7, 15,
              "unknown optimizer `adamm`", "did you mean `adam`")


def test_unknown_policy(cnn):
    check_bad(cnn, "layers:\n    gap -> dense classes\ntrain:\n    lr 0.1 policy=stpe\n", 7, 12,
              "unknown policy `stpe`", "did you mean `step`")


def test_negative_learning_rate(cnn):
    check_bad(cnn, "layers:\n    gap -> dense classes\ntrain:\n    lr -0.1\n", 7, 8,
              "the learning rate must be greater than 0, got -0.1")


def test_unknown_train_setting(cnn):
    check_bad(cnn, "layers:\n    gap -> dense classes\ntrain:\n    momentun 0.9\n", 7, 5,
              "unknown train setting `momentun`", "did you mean `momentum`")


def test_error_inside_block_names_block_line_and_call_site(cnn):
    body = ("block unit(c):\n"
            "    conv c 3x3 pad=1 -> bn -> add(in)\n"
            "layers:\n"
            "    conv 8 3x3 pad=1\n"
            "    unit(8)\n"
            "    unit(16)\n")
    r = check_bad(cnn, body, 5, 31, "add of tensors with different shapes: 16×32×32 and 8×32×32")
    assert "net.cnn:9:5: note: in block `unit`, called here" in r.err


def test_nested_block_error_lists_every_call_site(cnn):
    body = ("block inner(c):\n    conv c 5x5 stride=2\n"
            "block outer(c):\n    inner(c)\n"
            "layers:\n    outer(4)\n")
    r = check_bad(cnn, body, 5, 5, "conv output height is not an integer")
    assert "net.cnn:7:5: note: in block `inner`, called here" in r.err
    assert "net.cnn:9:5: note: in block `outer`, called here" in r.err
    assert r.err.index(":7:5: note") < r.err.index(":9:5: note")


def test_several_independent_errors_reported_together(cnn):
    body = ("layers:\n"
            "    conv 6 5x5 stride=2 -> relu\n"
            "    convv 16 3x3\n"
            "    conv 16 3x3 strides=2\n"
            "train:\n"
            "    optimizer adamm\n")
    path = cnn(HEADER + body)
    r = run_cli("check", str(path))
    assert r.code == 1
    assert [(line, col) for line, col, _ in r.errors()] == [(5, 5), (6, 5), (7, 17), (9, 15)]
    assert "4 errors generated." in r.err


def test_tensor_in_middle_of_chain(cnn):
    check_bad(cnn, "layers:\n    a = conv 8 3x3\n    conv 8 3x3 -> a\n", 6, 19, "tensor `a` in the middle of a chain")


def test_repeat_on_a_layer_is_explained(cnn):
    check_bad(cnn, "layers:\n    relu * 2\n", 5, 10, "syntax error", "`(conv 64 3x3 -> relu) * 2`")


def test_missing_input_declaration(cnn):
    check_bad(cnn, "layers:\n    relu\n", 1, 1, "no `input` declaration", header="network t\n")


def test_missing_file_is_an_error_not_a_traceback(tmp_path):
    r = run_cli("check", str(tmp_path / "nope.cnn"))
    assert r.code == 1 and "no such file" in r.err and "Traceback" not in r.err


def test_json_errors_go_to_stderr_with_location(cnn):
    path = cnn(HEADER + "layers:\n    conv 6 5x5 stride=2\n")
    r = run_cli("check", str(path), "--json")
    assert r.code == 1 and r.out == ""
    assert r.first_error()[1:3] == (5, 5)


def test_real_process_exit_code_and_no_traceback(cnn):
    path = cnn(HEADER + "layers:\n    conv 6 5x5 stride=2\n")
    r = run_process("check", str(path))
    assert r.code == 1
    assert "Traceback" not in r.err
    assert f"{path}:5:5: error:" in r.err


@pytest.mark.parametrize("bad_input", ["input 3x0x32\n", "input 3x32\n"])
def test_bad_input_declaration(cnn, bad_input):
    path = cnn("network t\n" + bad_input + "layers:\n    relu\n")
    r = run_cli("check", str(path))
    assert r.code == 1 and r.first_error()[1] == 2


def test_block_named_like_a_layer(cnn):
    check_bad(cnn, "block conv(c):\n    relu\nlayers:\n    conv 8 3x3\n", 4, 7, "block `conv` has the name of a layer")


def test_unknown_attribute_in_default(cnn):
    check_bad(cnn, "default conv padd=1\nlayers:\n    relu\n", 4, 14, "unknown attribute `padd` for `conv`",
              "did you mean `pad`")


@pytest.mark.parametrize("value", ["yes", "1"])
def test_flags_take_only_true_or_false(cnn, value):
    check_bad(cnn, f"layers:\n    conv 8 3x3 bias={value}\n", 5, 16, "takes true or false")


def test_integer_division_in_train_section(cnn):
    path = cnn(HEADER + "layers:\n    gap -> dense classes\ntrain:\n    batch 100 // 3\n")
    r = run_cli("check", str(path), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["train"]["batch"] == 33


def test_byte_order_mark_is_accepted(cnn):
    path = cnn("\ufeff" + HEADER + "layers:\n    gap -> dense classes\n")
    assert run_cli("check", str(path)).code == 0


def test_unused_layer_warning_goes_to_stderr(cnn):
    path = cnn(HEADER + "layers:\n    conv 8 3x3 pad=1\n    concat(in)\n")
    r = run_cli("check", str(path))
    assert r.code == 0 and f"{path}:5:5: warning: the result of `conv1` is never used" in r.err
