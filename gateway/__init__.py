"""The gateway runtime: configuration, storage, the broker link and the web page."""
