"""The harness: the engine, benchmark(), audit, cross-toolkit comparison, gate, sharding and merge, speed bench."""
