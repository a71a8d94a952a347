import sys

from stages.evaluate.cli import main

sys.exit(main())
