import sys

from refdecoder.cli import main

sys.exit(main())
