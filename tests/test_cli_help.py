"""`bgert --help` and every `bgert COMMAND --help`: one line per option, its default shown where it says
something, and the commands with many options grouped."""
from __future__ import annotations

import argparse

import pytest

from bgert.cli import COMMANDS, build_parser

PARSER = build_parser(COMMANDS)
SUBPARSERS = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction)).choices


def help_of(parser: argparse.ArgumentParser, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: nothing may wrap onto a second line anyway
    return parser.format_help()


@pytest.mark.parametrize("name", ["bgert", *COMMANDS])
def test_one_line_per_option_with_its_default(name, monkeypatch):
    parser = PARSER if name == "bgert" else SUBPARSERS[name]
    text = help_of(parser, monkeypatch)
    body = text.split("\n\n", 1)[1]  # after the usage block
    lines = body.splitlines()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        invocation = ", ".join(action.option_strings)
        line = next((x for x in lines if (x.lstrip() + " ").startswith(invocation + " ")), None)
        assert line is not None, f"{name}: no line for {action.option_strings[0]}"
        assert action.help and action.help.split()[0] in line, f"{name}: {action.option_strings[0]} has no help on its line"
        i = lines.index(line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        assert not following.startswith(" " * 8), f"{name}: {action.option_strings[0]}'s help continues on a second line"
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS) and "default" not in action.help:
            shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
            assert f"(default: {shown})" in line, f"{name}: {action.option_strings[0]} does not show its default"


def test_every_option_has_help():
    for name, sub in SUBPARSERS.items():
        for action in sub._actions:
            assert action.help, f"bgert {name} {action.option_strings or action.dest}: no help text"


@pytest.mark.parametrize("name", ["export", "encode", "serve", "bench", "eval", "triton-repo"])
def test_commands_with_many_options_are_grouped(name):
    groups = [g for g in SUBPARSERS[name]._action_groups if g._group_actions]
    assert len(groups) >= 3, f"bgert {name}: {[g.title for g in groups]}"


def test_top_level_lists_every_command(monkeypatch):
    text = help_of(PARSER, monkeypatch)
    for name, (_, summary) in COMMANDS.items():
        assert any(line.split() and line.split()[0] == name and summary in line for line in text.splitlines()), name
