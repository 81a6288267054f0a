"""A progress bar for the long loops: decoding a folder, predicting, evaluating."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int, description: str) -> Iterable[T]:
    """The items of iterable, with a bar (count, rate, time left) on stderr as they are consumed.
    Shown only when stderr is a terminal, so that logs and pipes get no bar and no control characters."""
    return tqdm(iterable, total=total, desc=description, file=sys.stderr, disable=not sys.stderr.isatty())
