"""The device side: written as firmware would be (paho-mqtt, its own tiny encoder).

It meets the processor only on the wire: nothing here imports processor/.
"""
