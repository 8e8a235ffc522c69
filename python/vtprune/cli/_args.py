"""Argument handling shared by the subcommands: one-line errors with exit code 2, and checks of paths and
devices made before any model is loaded, so a bad argument never ends in a traceback or a wasted load."""

from __future__ import annotations

import argparse
import os


class UsageError(Exception):
    """A bad command-line argument; the message names the argument (``--image 'x': ...``)."""


class Parser(argparse.ArgumentParser):
    """``argparse`` with a one-line error (``prog: error: message``, exit code 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """``type=`` for counts that must be >= 1 (``--repeats``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _require(flag: str, path: str, checks) -> str:
    """``path`` if every ``(predicate, problem)`` of ``checks`` holds, in order; else the first problem."""
    for ok, problem in checks:
        if not ok(path):
            raise UsageError(f"{flag} {path!r}: {problem}")
    return path


def readable_file(flag: str, path: str) -> str:
    """``path`` if it is an existing, readable regular file."""
    return _require(flag, path, [(os.path.exists, "no such file"), (os.path.isfile, "not a regular file"),
                                 (lambda p: os.access(p, os.R_OK), "not readable (permission denied)")])


def image_file(flag: str, path: str) -> str:
    """``path`` if PIL can open and decode it as an image."""
    readable_file(flag, path)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:  # truncated or not an image
        raise UsageError(f"{flag} {path!r}: not a readable image ({_first_line(e)})") from None
    return path


def model_dir(flag: str, path: str) -> str:
    """``path`` if it is a directory holding a Hugging Face ``config.json`` (a local checkpoint)."""
    expected = "(expected a local checkpoint directory)"
    return _require(flag, path, [
        (os.path.exists, f"no such directory {expected}"), (os.path.isdir, f"not a directory {expected}"),
        (lambda p: os.path.isfile(os.path.join(p, "config.json")),
         "no config.json in it (expected a save_pretrained checkpoint directory)")])


def writable_output(flag: str, path: str, *, extensions: tuple[str, ...] | None = None) -> str:
    """``path`` if a file can be created or overwritten there (the folder exists and is writable)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: is a directory, expected a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path!r}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path!r}: not writable (permission denied)")
    if extensions is not None and not path.lower().endswith(extensions):
        raise UsageError(f"{flag} {path!r}: expected a file name ending in one of {', '.join(extensions)}")
    return path


def torch_device(flag: str, text: str):
    """A ``torch.device`` that exists on this machine (``cuda`` only when CUDA is available)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise UsageError(f"{flag} {text!r}: not a device ({_first_line(e)}); expected cpu or cuda[:N]") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {text}: CUDA is not available here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {text!r}: expected cpu or cuda[:N]")
    return device


def choices_list(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list whose items are all in ``allowed``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise UsageError(f"{flag} {text!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                         f"expected a comma-separated list of {', '.join(allowed)}")
    return items


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
