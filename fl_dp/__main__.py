import sys

from fl_dp.cli import main

sys.exit(main())
