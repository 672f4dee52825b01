from infra.license_server.cli import main

main()
