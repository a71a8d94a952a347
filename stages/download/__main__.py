import sys

from stages.download.cli import main

sys.exit(main())
