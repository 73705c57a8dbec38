"""KServe adapter: the predictor (`serving.model`), the wire schema (`serving.schema`), the
server bound to one address (`serving.server`) and the client (`serving.client`)."""
