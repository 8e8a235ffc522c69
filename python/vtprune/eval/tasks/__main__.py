"""``python -m vtprune.eval.tasks [DIR]``: write the tiny task folder and print its path."""

import sys

from vtprune.eval.tasks import include_path

print(include_path(sys.argv[1] if len(sys.argv) > 1 else None))
