"""`python -m stages.download`: the download container's entrypoint.

The exit skips the interpreter's teardown: by then everything is written and reported, and native
threads of the libraries img2dataset loads (pyarrow, OpenCV, the S3 client) can abort it with
"terminate called without an active exception" (exit code 134), hiding our exit code.
"""

import logging
import os
import sys

from stages.download.cli import main

code = main()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
