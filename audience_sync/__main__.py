import sys

from audience_sync.cli import main

sys.exit(main())
