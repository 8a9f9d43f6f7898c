"""What every fedpipe command line shares: one-line usage errors and checked addresses."""

from __future__ import annotations

import argparse
from typing import NoReturn

from fedpipe.deploy.preflight import check_port, split_address

__all__ = ["Parser", "address", "port"]


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the error and where help is), not the full
    usage block, which for these commands runs to a dozen lines and buries the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def port(text: str) -> int:
    """A TCP port, 1..65535, checked when the arguments are read."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)") from None
    try:
        return check_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def address(text: str) -> str:
    """HOST:PORT, checked when the arguments are read; kept as written for Flower."""
    try:
        split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return text
