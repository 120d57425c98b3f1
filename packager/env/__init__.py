"""Stage 3, ``env``: the model's requirements as a hash-pinned lock for the image, and the
wheelhouse the image installs from.

Modules: ``target`` (Python and platform of the image), ``inputs`` (what to resolve, from
the model spec and the server), ``lock`` (the lock file: typed, rendered, parsed,
verified), ``resolve`` (uv and pip-tools behind one interface, cached by input digest),
``wheelhouse`` (download and verify every locked wheel into a shared cache).
"""
