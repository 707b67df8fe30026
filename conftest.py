# Lets tests import the top-level modules (muon, model, train) from a plain `pytest` run.
import pytest

import data.demo


@pytest.fixture(autouse=True, scope="session")
def demo_shards_outside_the_checkout(tmp_path_factory):
    """The bench scripts build data.demo's shards in data/cache/demo by default: in the tests they
    go to a temporary folder, so the suite writes nothing into the checkout."""
    data.demo.DEFAULT_DIR = tmp_path_factory.mktemp("demo") / "demo"
