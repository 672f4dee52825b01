from infra.oci.cli import main

raise SystemExit(main())
