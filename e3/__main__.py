from e3.cli import main

raise SystemExit(main())
