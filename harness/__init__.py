"""Real servers on loopback for the demo, the tests and the benchmark: mosquitto, redis-server,
influxd, the embedded amqtt broker and the processor, each on a free port with its data in a
temporary folder, started, probed until ready, and stopped by PID."""
