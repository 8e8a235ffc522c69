"""Command line: ``python -m vtprune <command>``.

``ops``: run the ops at real-model shapes (see :mod:`vtprune.ops_demo`). ``demo``: the main job; until the
model integration lands it runs the ops demo.
"""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("demo", "ops")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m vtprune {{{','.join(commands)}}} [options]  (--help after a command for more)")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    from vtprune import ops_demo

    ops_demo.main(argv[1:])


if __name__ == "__main__":
    main()
