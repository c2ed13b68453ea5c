"""The command line's argument parser: argparse, with errors that say what to
type instead.

- An unknown flag is reported by the subcommand (its usage, not the top-level
  one) with the closest flag it has: `--rank_ratio` -> `--rank-ratio`.
- `--model A B` (B taken as the recipe, or left over): each model needs its
  own `--model`.

And the exit of a command whose reader went away (`ccsmerge plan | head`)."""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys

# What a process killed by SIGPIPE reports to its shell (128 + 13): what cat,
# grep and git give in `... | head`; `set -o pipefail` scripts see it too.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
_RECIPE_SUFFIXES = (".yml", ".yaml")


class CcsmergeParser(argparse.ArgumentParser):
    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        namespace, extras = self.parse_known_args(argv, namespace)
        parser = self._command_parser(namespace) or self
        strays = _strays_after_model(argv) if "--model" in parser._option_string_actions else []
        if strays:
            first, _ = strays[0]
            fixed = " ".join(f"--model {p}" for p in [first] + [s for _, s in strays])
            listed = ", ".join(repr(s) for _, s in strays)
            verb = "follows" if len(strays) == 1 else "follow"
            parser.error(f"{listed} {verb} --model {first}: each model needs its own --model ({fixed})")
        if extras:
            parser.error("unrecognized arguments: " + " ".join(_with_suggestion(parser, e) for e in extras))
        return namespace

    def _command_parser(self, namespace) -> argparse.ArgumentParser | None:
        """The subcommand's parser that parsed the arguments, if any."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if isinstance(chosen, CcsmergeParser):
                    return chosen._command_parser(namespace) or chosen
        return None


def _with_suggestion(parser: argparse.ArgumentParser, extra: str) -> str:
    if not extra.startswith("-"):
        return extra
    flag = extra.split("=", 1)[0]
    flags = [f for f in parser._option_string_actions if f.startswith("--")]
    dashed = flag.replace("_", "-")
    close = [dashed] if dashed in flags else difflib.get_close_matches(flag, flags, n=1, cutoff=0.6)
    return f"{extra} (did you mean {close[0]}?)" if close else extra


def _strays_after_model(argv: list[str]) -> list[tuple[str, str]]:
    """(model, stray) for each word right after `--model PATH` that is not an
    option: `--model A B` means two models. A recipe file there is not one
    (the recipe-and-flags conflict has its own message)."""
    strays: list[tuple[str, str]] = []
    model = None  # the last --model's value while words follow it
    words = iter(argv)
    for word in words:
        if word == "--":
            break
        if word == "--model":
            model = next(words, None)
        elif word.startswith("--model="):
            model = word.split("=", 1)[1]
        elif word.startswith("-") or model is None:
            model = None
        elif not word.lower().endswith(_RECIPE_SUFFIXES):
            strays.append((model, word))
    return strays


def exit_quietly_on_broken_pipe() -> int:
    """stdout's reader is gone (`ccsmerge plan | head -2`): print nothing more
    and exit as a process killed by SIGPIPE would. stdout is pointed at
    /dev/null so that the flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a captured stdout)
        pass
    return EXIT_BROKEN_PIPE
