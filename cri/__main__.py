import sys

from cri.daemon.cli import main

sys.exit(main())
