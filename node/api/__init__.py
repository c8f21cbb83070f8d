"""How people and programs reach a node: the HTTP control API, the control socket, the
dashboard, OpenAPI and Prometheus metrics."""
