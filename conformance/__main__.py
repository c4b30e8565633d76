"""``python -m conformance``: see :mod:`conformance.suite`."""

from conformance.suite import main

raise SystemExit(main())
