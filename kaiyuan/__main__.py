import sys

from kaiyuan.cli import main

sys.exit(main())
