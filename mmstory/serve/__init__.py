"""Serve a trained model over HTTP: ``mmstory serve MODEL`` (cli.py), the app (app.py), the model side of it
(service.py) and dynamic batching (batcher.py). Needs the ``serve`` extra: ``pip install 'mmstory[serve]'``."""
