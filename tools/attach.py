"""Maintainer shortcut for ``posepriors-attach`` (:mod:`posepriors.attach`), as the release scripts call it."""

import sys

from posepriors.attach import main

if __name__ == "__main__":
    sys.exit(main())
