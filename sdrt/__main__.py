import sys

from sdrt.cli import main

sys.exit(main())
