"""``packager webhook``: registry events in, releases out, nothing lost in between.

MLflow (3.3+) posts a registry event from a thread pool, retries it a few times and never
again (``mlflow/webhooks/delivery.py``): there is no delivery log to catch up from. So the
receiver makes an accepted event durable before it answers, and runs
:func:`packager.release.release_model` for it later, retrying, until it completes once:

- :mod:`.signature` checks ``X-MLflow-Signature`` and the delivery's age;
- :mod:`.rules` reads the rules file and turns an event into release jobs;
- :mod:`.queue` is the SQLite (WAL) store of deliveries and jobs;
- :mod:`.worker` is the pool that claims jobs and runs the release;
- :mod:`.receiver` is the HTTP server that ties them together.
"""
