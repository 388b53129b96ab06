"""Every command-line entry point answers a bad argument with one line naming it and exit code 2, not argparse's
usage block; --help still prints the usage."""
import os
import subprocess
import sys

from helpers import REPO

# module: the prog its one-line errors start with (write_shards keeps its short name for all of its errors)
ENTRY_POINTS = {
    "dico_scale.train": "dico_scale.train", "dico_scale.evaluate": "dico_scale.evaluate",
    "dico_scale.caption": "dico_scale.caption", "dico_scale.export": "dico_scale.export",
    "dico_scale.compare": "dico_scale.compare", "dico_scale.demo": "dico_scale.demo",
    "dico_scale.convert": "dico_scale.convert", "dico_scale.tracking": "python -m dico_scale.tracking",
    "dico_scale.models.tiny": "dico_scale.models.tiny", "dico_scale.data.synthetic": "dico_scale.data.synthetic",
    "dico_scale.data.write_shards": "write_shards",
}
NOT_COMMANDS = {"dico_scale.exit_codes"}  # prints the exit codes for shell scripts; takes no arguments


def modules_with_a_main() -> set[str]:
    found = set()
    for root, _, files in os.walk(REPO / "dico_scale"):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".py") and 'if __name__ == "__main__":' in open(path).read():
                found.add(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    return found


def test_every_entry_point_is_listed():
    assert modules_with_a_main() - NOT_COMMANDS == set(ENTRY_POINTS)


def test_a_bad_flag_is_one_line_and_exit_2():
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--no-such-flag"], cwd=REPO, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in ENTRY_POINTS}
    for module, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (module, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{ENTRY_POINTS[module]}: error:"), (module, err)
        assert "usage:" not in err, (module, err)


def test_every_help_says_what_the_command_does_in_whole_sentences(capsys):
    """The description under --help's usage is whole: a docstring's first line cut mid-sentence is not."""
    import importlib

    import pytest

    for module in ENTRY_POINTS:
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main(["--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0, module
        description = " ".join(out.split("\n\n")[1].split())  # the paragraph after the usage block
        assert len(description) > 20 and description.endswith("."), (module, description)


def test_help_still_shows_the_usage():
    proc = subprocess.run([sys.executable, "-m", "dico_scale.caption", "--help"], cwd=REPO, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dico_scale.caption")
    assert "--length-penalty" in proc.stdout


def test_an_option_given_twice_is_refused_not_overridden(capsys):
    """argparse keeps the last of a repeated option (`--config a.yaml --config b.yaml` would train b alone): every
    entry point refuses it instead, before it checks anything else. Each one's first option that takes a value (of
    its first subcommand where it has subcommands)."""
    import importlib
    import re

    import pytest

    for module in ENTRY_POINTS:
        main = importlib.import_module(module).main
        with pytest.raises(SystemExit):
            main(["--help"])
        usage = capsys.readouterr().out
        sub = [m.group(1).split(",")[0]] if (m := re.search(r"^usage: .* \{([a-z_,-]+)\}", usage, re.M)) else []
        if sub:
            with pytest.raises(SystemExit):
                main([*sub, "--help"])
            usage = capsys.readouterr().out
        option = re.search(r"^  (--[a-z-]+) [A-Z_]+", usage, re.M).group(1)
        with pytest.raises(SystemExit) as exit_:
            main([*sub, f"{option}=1", option, "2"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err, (module, err)
        assert err.endswith(f": error: {option} given 2 times: give it once"), (module, err)


def test_an_abbreviated_option_is_not_the_option(capsys):
    """argparse takes `--conf` for `--config` by default, which would slip a second copy past the check above."""
    import pytest

    from dico_scale.errors import OneLineParser

    top = OneLineParser(prog="p")
    top.add_argument("--config")
    withsub = OneLineParser(prog="p")
    withsub.add_subparsers(dest="command").add_parser("run").add_argument("--uri")  # subcommands' are OneLineParsers
    for parser, argv, abbreviation in ((top, ["--config", "a.yaml", "--conf", "b.yaml"], "--conf"),
                                       (withsub, ["run", "--ur", "x"], "--ur")):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("p") and "\n" not in err and abbreviation in err, err
