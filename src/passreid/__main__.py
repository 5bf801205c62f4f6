import sys

from passreid.cli import main

sys.exit(main())
