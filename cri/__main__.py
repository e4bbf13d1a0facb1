import sys

from cri.cli import main

sys.exit(main())
