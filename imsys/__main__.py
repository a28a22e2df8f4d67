from imsys.cli import main

raise SystemExit(main())
