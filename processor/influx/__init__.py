"""Every accepted vote as a point in InfluxDB: the line protocol, the clients of both APIs,
the questions ``recount`` and ``export`` ask, and the drainer that moves queued points there."""
