"""``python -m vtprune <command>``: see :mod:`vtprune.cli` (``vtprune --help`` lists the commands)."""

from vtprune.cli import main
from vtprune.cli.demo import demo, make_method

__all__ = ["main", "demo", "make_method"]

if __name__ == "__main__":
    main()
