import sys

from robustmargin.cli.main import main

sys.exit(main())
