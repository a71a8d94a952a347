import sys

from stages.train.cli import main

sys.exit(main())
