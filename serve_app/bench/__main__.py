from serve_app.bench.cli import main

main()
