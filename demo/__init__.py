"""The local demo: real Kafka, Prometheus, aggregator shards and a simulated fleet."""
