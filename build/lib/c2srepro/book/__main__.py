import sys

from c2srepro.book.runner import main

sys.exit(main())
