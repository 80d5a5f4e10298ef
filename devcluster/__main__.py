import sys

from aar_devcluster.cli import main

sys.exit(main())
