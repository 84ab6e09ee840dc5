"""
What every nanopath script's command line shares: numbers checked against their range at start-up (bounded), paths
that must exist (existing_path), help that shows each flag's default and range, the closest flags for a mistyped one
(Parser), and progress that is a bar on a terminal and plain periodic lines in a log file (progress).
"""
import argparse
import difflib
import os
import sys
import time

from tqdm import tqdm


def bounded(kind, lo=None, hi=None):
    """An argparse type: a number of `kind` in [lo, hi]; anything else fails at start-up naming the valid range,
    which --help shows too."""
    what = "an integer" if kind is int else "a number"
    valid = " and ".join(([f">= {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else []))

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {what} {valid}")
        return value
    parse.range = valid
    return parse


def existing_path(text):
    """An argparse type: a file or folder that exists (nothing is ever downloaded)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text!r} does not exist (nothing is downloaded: give a local path)")
    return text


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with every flag's default and, for a bounded number, its valid range."""

    def _get_help_string(self, action):
        notes = [f"range {action.type.range}"] if getattr(action.type, "range", None) else []
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            notes.append("default: %(default)s")
        return f"{action.help or ''} [{'; '.join(notes)}]" if notes else action.help


def _options(parser):
    """Every flag of a parser and of its subcommands."""
    for action in parser._actions:
        yield from action.option_strings
        for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
            yield from _options(sub)


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter, and an unknown flag answered with the closest known ones (--batch_size:
    did you mean --batch-size?), as Python 3.14's suggest_on_error does for choices."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            known = sorted(set(_options(self)))
            hints = [f"{flag} -> {match[0]}" for flag in (e.split("=")[0] for e in extras if e.startswith("--"))
                     for match in [difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.7)]
                     if match]
            self.error(f"unrecognized arguments: {' '.join(extras)}" +
                       (f" (did you mean {', '.join(hints)}?)" if hints else ""))
        return namespace


def on_terminal():
    return sys.stderr.isatty()


class LineProgress:
    """tqdm's interface as plain lines (one every `every` seconds, and one at the end), for a log file: a
    redirected tqdm bar is one line of carriage returns thousands of characters long."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", initial=0, every=30.0, **_):
        self.iterable, self.desc, self.unit, self.every = iterable, desc, unit, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start, self.postfix, self.shown = initial, time.time(), {}, None
        self.last = self.start

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every:
            self.show()

    def set_postfix(self, **postfix):
        self.postfix = postfix

    def show(self):
        self.last, elapsed = time.time(), time.time() - self.start
        of = f"/{self.total}" if self.total else ""
        post = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc + ': ' if self.desc else ''}{self.n}{of} {self.unit} in {elapsed:.0f}s "
              f"({self.n / max(elapsed, 1e-9):.2f} {self.unit}/s{post})", file=sys.stderr, flush=True)
        self.shown = self.n

    def close(self):
        if self.shown != self.n:
            self.show()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal; plain periodic lines when stderr is a file (a cluster's log), as DINOv2's and
    nanoGPT's logs read. `every`: seconds between lines in a log (None: only the last one)."""
    every = kwargs.pop("every", 30.0)
    if kwargs.get("disable") or on_terminal():
        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, every=float("inf") if every is None else every, **kwargs)
