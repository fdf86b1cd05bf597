import sys

from bgert.cli import main

sys.exit(main())
