"""`python -m gemq_gguf.evaluate`: see cli.py."""
import sys

from .cli import main

sys.exit(main())
