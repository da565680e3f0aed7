"""The transport limit: a bare grpc.aio VaeService whose Sample returns a prebuilt response of the
same size as the real one, with no model behind it.

    python -m bench.echo --port 50061 --image-shape 1,28,28
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import numpy as np

from service import commands
from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.tensors import from_array


class Echo(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, image_shape: tuple[int, ...]) -> None:
        self.image_shape = image_shape
        self.cache: dict[int, pb.SampleResponse] = {}

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        n = request.num_samples
        if n not in self.cache:
            images = np.zeros((n, *self.image_shape), np.float32)
            self.cache[n] = pb.SampleResponse(images=pb.Images(tensor=from_array(images)), seed=request.seed)
        return self.cache[n]


async def serve(port: int, image_shape: tuple[int, ...]) -> None:
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    vae_pb2_grpc.add_VaeServiceServicer_to_server(Echo(image_shape), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo on port {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=commands.summary(__doc__))
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--image-shape", default="1,28,28")
    args = parser.parse_args()
    asyncio.run(serve(args.port, tuple(int(s) for s in args.image_shape.split(","))))


if __name__ == "__main__":
    main()
