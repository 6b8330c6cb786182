from zygote.cli import main

raise SystemExit(main())
