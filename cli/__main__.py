"""`python -m enginebuild_cli ...` is `enginebuild ...`."""

import sys

from .main import main

sys.exit(main())
