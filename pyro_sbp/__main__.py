import sys

from pyro_sbp.cli import main

sys.exit(main())
