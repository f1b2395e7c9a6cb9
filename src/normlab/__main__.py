import sys

from normlab.cli import entry

sys.exit(entry())
