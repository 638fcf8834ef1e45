"""Every command in the README's ```bash blocks parses against the real CLI (nothing is run but the
cheap ones: --version, `models list`, and each command's --help), so that a README followed
literally never meets "no such option"."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.cli.check import CommandLineError, check_command_line

README = Path(__file__).resolve().parents[1] / "README.md"
SEPARATORS = {"&&", "||", "&", ";", "|"}
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped, split at
    && || & ; |, environment assignments in front removed."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in SEPARATORS:
                out.append(current)
                current = []
            else:
                current.append(token)
        out.append(current)
    cleaned = []
    for words in out:
        while words and ENV.match(words[0]):
            words = words[1:]
        if words:
            cleaned.append(words)
    return cleaned


def workbench_commands(markdown: str) -> list[list[str]]:
    """The argv of every `workbench ...` command, and of the benchmark commands given to `gate --run`."""
    found = [c[1:] for block in bash_blocks(markdown) for c in commands(block) if c[0] == "workbench"]
    inner = [shlex.split(c[c.index("--run") + 1])[1:] for c in found if c[0] == "gate" and "--run" in c]
    return found + inner


README_COMMANDS = workbench_commands(README.read_text())


def test_the_splitter_handles_the_shell_forms():
    block = ("A=1 B=2 workbench serve tiny --port 8000 &\n"
             "curl -s localhost:8000/v1/models -H 'a: b' && workbench bench serve --model tiny \\\n"
             "    --goodput ttft:500 tpot:50   # a comment --bogus\n"
             "pip install -e . && workbench tune\n")
    assert commands(block) == [["workbench", "serve", "tiny", "--port", "8000"],
                               ["curl", "-s", "localhost:8000/v1/models", "-H", "a: b"],
                               ["workbench", "bench", "serve", "--model", "tiny", "--goodput", "ttft:500", "tpot:50"],
                               ["pip", "install", "-e", "."], ["workbench", "tune"]]


def test_the_readme_has_workbench_commands():
    paths = {tuple(c[:2]) for c in README_COMMANDS}
    assert len(README_COMMANDS) > 20 and ("bench", "serve") in paths and ("tune",) in {c[:1] and tuple(c[:1])
                                                                                        for c in README_COMMANDS}


@pytest.mark.parametrize("argv", README_COMMANDS, ids=lambda a: " ".join(a)[:70])
def test_every_readme_command_parses(argv):
    check_command_line(argv)


@pytest.mark.parametrize("snippet, message", [
    ("workbench bench serve --model m --goodputs ttft:500\n", "--goodputs"),
    ("workbench serve tiny --max-num-seq 8 &\n", "--max-num-seq"),  # an abbreviation is not a flag
    ("workbench tune --workers 2\n", "--workers"),
    ("X=1 workbench bench throughput --model tiny \\\n  --num-prompt 3\n", "--num-prompt"),
    ("workbench gate --metric a:-5% --curent x.json\n", "--curent"),
])
def test_an_unknown_flag_in_a_snippet_fails(snippet, message):
    (argv,) = workbench_commands(f"```bash\n{snippet}```\n")
    with pytest.raises(CommandLineError, match=re.escape(message)):
        check_command_line(argv)


def test_cheap_readme_commands_run():
    runner = CliRunner()
    ran = [c for c in README_COMMANDS if c in (["--version"], ["models", "list"])]
    assert ran, "the README shows `workbench --version` and `workbench models list`"
    for argv in ran:
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    assert "pagedbench" in runner.invoke(app, ["--version"]).output


@pytest.mark.parametrize("path", sorted({tuple(c[:2]) if c[0] in ("bench", "models") else tuple(c[:1])
                                         for c in README_COMMANDS if not c[0].startswith("-")}))
def test_help_of_each_readme_command(path, capsys):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "usage" in (result.output + capsys.readouterr().out).lower()
