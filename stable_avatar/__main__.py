"""``python -m stable_avatar`` is ``stable-avatar``."""

import sys

from stable_avatar.cli import main

sys.exit(main())
