from infra.gcp.cli import main

raise SystemExit(main())
