"""`python -m serving.server`: see serving.server.app."""

import sys

from serving.server.app import main

sys.exit(main())
