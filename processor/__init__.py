"""votebox processor: validates, de-duplicates and tallies CBOR votes from MQTT."""
