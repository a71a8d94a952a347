import sys

from stages.export.cli import main

sys.exit(main())
