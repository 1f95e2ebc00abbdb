import sys

if sys.argv[1:2] == ["plan"]:
    from c2srepro.book.plan import main

    sys.exit(main(sys.argv[2:]))

from c2srepro.book.runner import main

sys.exit(main())
