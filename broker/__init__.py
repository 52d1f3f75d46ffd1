"""The embedded MQTT broker (amqtt): `votebox broker`, for the demo and small sites."""
