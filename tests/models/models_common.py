"""Helpers shared by the model tests (not in conftest.py: test modules import them by name, and another test
folder's conftest module would shadow this folder's in a session that collects both)."""



SCHEDULE = dict(encoder=(12, 2), stages={1: (8, 2), 2: (6, 1), 3: (4, 1)})

