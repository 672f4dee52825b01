from license_server.cli import main

main()
