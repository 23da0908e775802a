"""Built-in backends, one module each. A backend module must import cheaply:
optional dependencies (ray, zmq, the C core) are imported inside the class, on first use."""
