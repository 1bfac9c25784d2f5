"""Helpers shared by test packages: a TLS mosquitto broker and scripted MQTT servers."""
