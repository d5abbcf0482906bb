import sys

from fusedit.cli import main

sys.exit(main())
