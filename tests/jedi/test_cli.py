"""The ``jedi`` command: subcommands are listed and delegated ones reach their own parsers."""
import pytest

from jedi import cli


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("synth", "train", "demo", "sample", "eval"):
        assert name in out


@pytest.mark.parametrize("name, flag", [("sample", "--refs"), ("eval", "--generated")])
def test_delegated_subcommands_parse_their_own_arguments(capsys, name, flag):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert flag in capsys.readouterr().out


def test_sample_without_arguments_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample"])
    assert e.value.code == 2
    assert "--refs" in capsys.readouterr().err
