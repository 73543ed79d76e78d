"""``python -m agent``: the chronicle-agent command line."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
