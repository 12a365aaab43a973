import sys

from mammofl.cli import main

sys.exit(main())
