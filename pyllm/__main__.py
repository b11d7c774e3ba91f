"""``python -m pyllm`` runs the command line."""

import sys

from pyllm.cli import main

sys.exit(main())
