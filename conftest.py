# Lets tests import the top-level modules (muon, model, train) from a plain `pytest` run.
