"""Suite-wide fixtures: the real Cassandra nodes come from tests.cassandra_fixtures."""

pytest_plugins = ["tests.cassandra_fixtures"]
