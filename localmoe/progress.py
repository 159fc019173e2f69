"""Progress on a terminal: a counter on stderr that rewrites itself, silent when stderr is not a TTY."""

import sys
from collections.abc import Iterable, Iterator


def progress(items: Iterable, total: int, label: str) -> Iterator:
    """Yield items, showing `label: done/total` as they go."""
    show = sys.stderr.isatty() and total > 1
    for done, item in enumerate(items, start=1):
        yield item
        if show:
            sys.stderr.write(f"\r{label}: {done}/{total}")
            sys.stderr.flush()
    if show:
        sys.stderr.write("\r\033[K")  # leave the line clean for what follows
        sys.stderr.flush()
