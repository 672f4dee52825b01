"""The benchmark MariTalk Local users know (``python -m serve_app.bench``), its load generator,
and ``--compare``: this app against raw vLLM and Ray Serve LLM, side by side in one run."""
