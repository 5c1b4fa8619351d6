"""`python -m enginebuild_devstack ...` is `enginebuild-dev ...`."""

import sys

from .cli import main

sys.exit(main())
