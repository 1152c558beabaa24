import os
import sys

from .cli import main

try:
    sys.exit(main())
except BrokenPipeError:
    # The reader of our output went away (`stats ROOT | head`): nothing is wrong with the build. Later
    # writes, Python's own flush at exit included, go nowhere instead of raising again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)
