"""The HTTP port: the Open Inference Protocol's REST API and vae.v1 as plain HTTP, over the same data
plane as the gRPC port, served by uvicorn in the server's own event loop."""
