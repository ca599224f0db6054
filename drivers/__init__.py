"""Drivers turn raw input (MQTT payloads, GPIO, BLE, serial) into engine events.

They import nothing from ``gateway``; the gateway wires them in.
"""
