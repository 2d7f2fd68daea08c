"""The speculation flags: parsed into engine options, bad combinations refused with a
clear CLI error, and `epd generate` with n-gram speculation gives the plain output."""
from __future__ import annotations

import pytest

from deploy.cli import build_parser, engine_options, main
from deploy.local import _speculative_flags


def _args(*flags: str):  # noqa: ANN202
    return build_parser().parse_args(["generate", "--prompt", "hi", *flags])


def test_flags_reach_engine_options() -> None:
    options = engine_options(_args("--speculative", "draft", "--num-speculative-tokens", "5",
                                   "--speculative-draft-model", "/m"))
    assert (options["speculative"], options["num_speculative_tokens"], options["speculative_draft_model"]) == \
        ("draft", 5, "/m")
    assert engine_options(_args())["speculative"] is None
    assert _speculative_flags(_args("--speculative", "ngram")) == (
        "--speculative", "ngram", "--num-speculative-tokens", "3", "--speculative-ngram-max", "3")
    assert _speculative_flags(_args()) == ()
    assert engine_options(_args())["speculative_cuda_graphs"] is True  # on by default
    assert "--no-speculative-cuda-graphs" not in _speculative_flags(_args("--speculative", "ngram"))
    eager = _args("--speculative", "ngram", "--no-speculative-cuda-graphs")
    assert engine_options(eager)["speculative_cuda_graphs"] is False
    assert _speculative_flags(eager)[-1] == "--no-speculative-cuda-graphs"


def test_bad_speculative_flags_are_cli_errors(capsys) -> None:  # noqa: ANN001
    assert main(["generate", "--prompt", "hi", "--speculative", "draft"]) == 2
    assert "--speculative draft needs --speculative-draft-model DIR" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--speculative-draft-model", "/m"]) == 2
    assert "needs --speculative draft" in capsys.readouterr().err
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "--prompt", "hi", "--num-speculative-tokens", bad])
        assert "expected a positive integer" in capsys.readouterr().err


def test_generate_with_ngram_matches_plain(capsys) -> None:  # noqa: ANN001
    base = ["generate", "--prompt", "The quick brown fox", "--max-tokens", "12"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--speculative", "ngram", "--num-speculative-tokens", "2"]) == 0
    assert capsys.readouterr().out == plain
