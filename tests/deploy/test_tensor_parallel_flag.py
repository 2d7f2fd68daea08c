"""`--tensor-parallel-size` on the command line: it reaches the engine's config, and a size
the model or the role cannot take stops the command with a clear error (exit 2) before
any rank starts."""
from __future__ import annotations

import pytest

from deploy.cli import build_parser, engine_options, main


def test_flag_reaches_the_engine_options() -> None:
    args = build_parser().parse_args(["worker", "decode", "--tensor-parallel-size", "2",
                                      "--tensor-parallel-timeout", "30"])
    options = engine_options(args)
    assert options["tensor_parallel_size"] == 2 and options["tensor_parallel_timeout_s"] == 30.0
    assert engine_options(build_parser().parse_args(["generate", "--prompt", "x"]))["tensor_parallel_size"] == 1


def test_a_size_the_model_cannot_split_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--tensor-parallel-size", "3"]) == 2
    assert "tensor_parallel_size 3 must divide num_attention_heads (4)" in capsys.readouterr().err
    assert main(["worker", "decode", "--transfer", "none", "--tensor-parallel-size", "3"]) == 2
    assert "must divide num_attention_heads" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["worker", "encode", "--tensor-parallel-size", "2"], "applies to prefill and decode workers"),
    (["worker", "prefill", "--tensor-parallel-size", "0"], "must be a positive integer"),
    (["worker", "prefill", "--tensor-parallel-size", "2", "--device", "cuda"], "only with --transfer none"),
])
def test_worker_flags_that_cannot_work_are_usage_errors(args: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
