"""A Python client (numpy in, numpy out) and a command line for the VAE service.

    python -m service.client sample -n 64 --out grid.png
    python -m service.client --model mnist --version 2 info
    python -m service.client reconstruct --input photo.jpg --out recon.png
    python -m service.client models | load NAME | unload NAME
    python -m service.client --model mnist-cvae sample -n 16 --class 7 --out sevens.png
    python -m service.client --model mnist-cvae classify --input digit.png
    python -m service.client --model mnist-cvae edit --input digit.png --to 3 --strength 1 --out three.png
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from service.api.vae.v1 import vae_pb2 as pb
from service.api.vae.v1 import vae_pb2_grpc
from service.commands import Parser
from service.imaging import grid
from service.tensors import from_array, tensor_to_numpy

FORMATS = {"float32": pb.IMAGE_FORMAT_FLOAT32, "uint8": pb.IMAGE_FORMAT_UINT8, "png": pb.IMAGE_FORMAT_PNG}


def _images(msg: pb.Images) -> np.ndarray | list[bytes]:
    return list(msg.png) if msg.format == pb.IMAGE_FORMAT_PNG else tensor_to_numpy(msg.tensor)


Inputs = np.ndarray | list[bytes]  # images [N, C, H, W] float32 in [0, 1] (or uint8), or encoded image files


def _inputs(images: Inputs) -> dict[str, Any]:
    """The request fields for images: a tensor, or encoded files the server prepares itself."""
    if isinstance(images, np.ndarray):
        return {"images": from_array(images)}
    return {"image_files": list(images)}


class VaeClient:
    """Blocking client. Images go in as [N, C, H, W] float32 in [0, 1] (or uint8), or as encoded
    image files (bytes of any format and size, prepared by the server as the model's training data
    was), and come back
    in the format asked for: float32 (default), uint8, or a list of PNG files. Every call goes to
    `model` (default: the server's default model) at `version` (0: the newest it serves), and
    `answered_by` holds the (model, version) that answered the last one, `classes` the classes of
    a conditional model it used (by name, one per row; `classes` arguments take names or indices)."""

    def __init__(
        self, target: str = "localhost:50051", timeout: float | None = 30.0, max_message_bytes: int = 64 << 20,
        ca: Path | None = None, cert: Path | None = None, key: Path | None = None, token: str | None = None,
        model: str = "", version: int = 0,
    ) -> None:  # fmt: skip
        """TLS when `ca` is given (the CA that signed the server's certificate); mutual TLS with
        `cert` and `key` as well; `token` is sent as `authorization: Bearer <token>`."""
        self.model, self.version = model, version
        self.answered_by: tuple[str, int] | None = None
        self.classes: list[str] = []
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        if ca or cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca).read_bytes() if ca else None,
                private_key=Path(key).read_bytes() if key else None,
                certificate_chain=Path(cert).read_bytes() if cert else None,
            )
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = vae_pb2_grpc.VaeServiceStub(self.channel)
        self.call = {"timeout": timeout, "metadata": [("authorization", f"Bearer {token}")] if token else None}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _target(self) -> dict[str, Any]:
        return {"model_name": self.model, "model_version": self.version}

    def _answered(self, response: Any) -> Any:
        self.answered_by = (response.model_name, response.model_version)
        self.classes = list(getattr(response, "classes", getattr(response, "source_classes", [])))
        return response

    def models(self) -> pb.ListModelsResponse:
        """Every model and version of the server's repository, with its state."""
        return self.stub.ListModels(pb.ListModelsRequest(), **self.call)

    def load(self, name: str, version: int = 0) -> pb.ListModelsResponse:
        """Serve a model (its policy's versions, or also `version`) and wait until it is ready; needs an admin token."""
        return self.stub.LoadModel(pb.LoadModelRequest(model_name=name, model_version=version), **self.call)

    def unload(self, name: str, version: int = 0) -> pb.ListModelsResponse:
        """Stop serving a model (or one version) once its calls finish; needs an admin token."""
        return self.stub.UnloadModel(pb.UnloadModelRequest(model_name=name, model_version=version), **self.call)

    def info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(**self._target()), **self.call)

    def sample(
        self, n: int, seed: int | None = None, temperature: float | None = None, format: str = "float32",
        temperatures: Sequence[float] = (), classes: Sequence[str | int] = (),
    ) -> np.ndarray | list[bytes]:
        request = pb.SampleRequest(num_samples=n, seed=seed, temperature=temperature, format=FORMATS[format],
                                   temperatures=temperatures, classes=_names(classes), **self._target())  # fmt: skip
        return _images(self._answered(self.stub.Sample(request, **self.call)).images)

    def sample_stream(
        self, n: int, seed: int, chunk_rows: int = 0, temperature: float | None = None, classes: Sequence[str | int] = ()
    ) -> np.ndarray:
        request = pb.SampleRequest(num_samples=n, seed=seed, temperature=temperature, chunk_rows=chunk_rows,
                                   classes=_names(classes), **self._target())  # fmt: skip
        chunks, drawn = [], []
        for response in self.stub.SampleStream(request, **self.call):
            chunks.append(_images(self._answered(response).images))
            drawn += self.classes
        self.classes = drawn
        return np.concatenate(chunks)

    def encode(
        self, images: Inputs, sample: bool = False, seed: int | None = None, classes: Sequence[str | int] = ()
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """mu, sigma, and z (when sample=True)."""
        request = pb.EncodeRequest(**_inputs(images), sample=sample, seed=seed, classes=_names(classes), **self._target())
        r = self._answered(self.stub.Encode(request, **self.call))
        return tensor_to_numpy(r.mu), tensor_to_numpy(r.sigma), tensor_to_numpy(r.z) if sample else None

    def decode(self, latents: np.ndarray, format: str = "float32", classes: Sequence[str | int] = ()) -> np.ndarray | list[bytes]:
        request = pb.DecodeRequest(latents=from_array(latents.astype(np.float32)), format=FORMATS[format],
                                   classes=_names(classes), **self._target())  # fmt: skip
        return _images(self._answered(self.stub.Decode(request, **self.call)).images)

    def reconstruct(self, images: Inputs, format: str = "float32", classes: Sequence[str | int] = ()) -> np.ndarray | list[bytes]:
        request = pb.ReconstructRequest(**_inputs(images), format=FORMATS[format], classes=_names(classes), **self._target())
        return _images(self._answered(self.stub.Reconstruct(request, **self.call)).images)

    def interpolate(
        self, start: np.ndarray | bytes, end: np.ndarray | bytes, steps: int, spherical: bool = False,
        latents: bool = False, format: str = "float32", classes: Sequence[str | int] = (),
    ) -> tuple[np.ndarray | list[bytes], np.ndarray]:  # fmt: skip
        """Images along the path and its latents; start/end are images [C, H, W], latents [D]
        (latents=True), or encoded image files (bytes); a conditional model's `classes` of both
        ends, or of the start and the end."""
        method = pb.INTERPOLATION_METHOD_SPHERICAL if spherical else pb.INTERPOLATION_METHOD_LINEAR
        request = pb.InterpolateRequest(steps=steps, method=method, format=FORMATS[format], classes=_names(classes), **self._target())
        for side, value in (("start", start), ("end", end)):
            if isinstance(value, bytes):
                setattr(request, f"{side}_file", value)
            else:
                getattr(request, f"{side}_{'latent' if latents else 'image'}").CopyFrom(from_array(value))
        r = self._answered(self.stub.Interpolate(request, **self.call))
        return _images(r.images), tensor_to_numpy(r.latents)

    def score(
        self, images: Inputs, k: int = 64, seed: int | None = None, classes: Sequence[str | int] = ()
    ) -> dict[str, np.ndarray]:
        """Per image, in nats: elbo, reconstruction, kl, log_likelihood (IWAE, k samples); and
        bits_per_dim, the IWAE estimate in bits per dimension. A conditional model's given
        `classes`, or without them log_likelihood is the marginal over its classes."""
        request = pb.ScoreRequest(**_inputs(images), importance_samples=k, seed=seed, classes=_names(classes), **self._target())
        r = self._answered(self.stub.Score(request, **self.call))
        self.classes = [s.class_name for s in r.scores if s.class_name]
        keys = ("elbo", "reconstruction", "kl", "log_likelihood", "bits_per_dim")
        return {key: np.array([getattr(s, key) for s in r.scores]) for key in keys}

    def classify(self, images: Inputs, k: int = 64, seed: int | None = None) -> tuple[list[str], np.ndarray]:
        """A conditional model's classes (its order) and p(y|x) [N, K] per image, by Bayes' rule
        from its per-class likelihoods (k importance samples each); `classes` then holds each
        image's most probable class."""
        request = pb.ClassifyRequest(**_inputs(images), importance_samples=k, seed=seed, **self._target())
        r = self._answered(self.stub.Classify(request, **self.call))
        self.classes = [c.class_name for c in r.results]
        return list(r.classes), np.array([list(c.probabilities) for c in r.results])

    def edit(
        self, images: Inputs, target: str | int, strength: float | None = None, sources: Sequence[str | int] = (),
        format: str = "float32",
    ) -> np.ndarray | list[bytes]:  # fmt: skip
        """Images moved from their classes (`sources`, else the model's guess; `classes` then holds
        them) towards `target` by `strength` in [0, 1] (default 1)."""
        request = pb.EditRequest(**_inputs(images), target_class=str(target), strength=strength, source_classes=_names(sources),
                                 format=FORMATS[format], **self._target())  # fmt: skip
        return _images(self._answered(self.stub.Edit(request, **self.call)).images)


def _names(classes: Sequence[str | int]) -> list[str]:
    """Classes as the wire takes them: names, or indices written in decimal."""
    return [str(c) for c in classes]


def plain(message: Message) -> dict[str, Any]:
    """A message as JSON-ready values, every field shown. Protobuf's own JSON form writes 64-bit
    integers as strings (JavaScript cannot hold them); a person reading `info` wants numbers."""
    out = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message, out)


def _numbers(message: Message, out: dict[str, Any]) -> dict[str, Any]:
    """`out` with the 64-bit integers of `message` (and of its nested messages) as numbers."""
    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for field in message.DESCRIPTOR.fields:
        if field.name not in out:
            continue
        value = out[field.name]
        if field.cpp_type in wide:
            out[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None and isinstance(value, dict) and not field.message_type.GetOptions().map_entry:
            out[field.name] = _numbers(getattr(message, field.name), value)
    return out


def load_inputs(paths: list[Path]) -> Inputs:
    """.npy files ([N, C, H, W] or [C, H, W]) as one float32 array in [0, 1]; any other files are
    image files of any format and size, sent as they are for the server to prepare."""
    if all(p.suffix == ".npy" for p in paths):
        arrays = [np.load(p) for p in paths]
        arrays = [a[None] if a.ndim == 3 else a for a in arrays]
        return np.concatenate([a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays])
    if any(p.suffix == ".npy" for p in paths):
        raise ValueError("--input: give .npy arrays or image files, not both")
    return [p.read_bytes() for p in paths]


def _save(images: np.ndarray, out: Path | None) -> None:
    if out is None:
        print(f"{len(images)} images, shape {list(images.shape[1:])}")
    elif out.suffix == ".npy":
        np.save(out, images)
        print(f"wrote {out}")
    else:
        grid(images).save(out)
        print(f"wrote {out}")


def build_parser() -> Parser:
    """The command's parser: a pure reading of the flags (the docs' commands are checked with it)."""
    parser = Parser(prog="python -m service.client", description="Call the VAE service.")
    parser.add_argument("--target", default="localhost:50051")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM) that signed the server's: use TLS")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM), for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key (PEM), for mutual TLS")
    parser.add_argument("--token", default=os.environ.get("VAE_TOKEN"), help="bearer token (default: $VAE_TOKEN)")
    parser.add_argument("--model", default="", help="model name (default: the server's default model)")
    parser.add_argument("--version", type=int, default=0, help="model version (default: the newest served)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info")
    sub.add_parser("models", help="every model and version of the repository, with its state")
    for name in ("load", "unload"):
        p = sub.add_parser(name, help=f"{name} a model (needs an admin token when auth is on)")
        p.add_argument("name")
        p.add_argument("--only-version", type=int, default=0, help="one version (default: the policy's, or all)")
    p = sub.add_parser("sample")
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--temperatures", type=lambda s: [float(v) for v in s.split(",")], default=[],
                   help="one per latent group (see info's latent_groups), comma-separated, instead of --temperature")
    p.add_argument("--out", type=Path, help=".png (a grid) or .npy")
    class_help = "a conditional model's class (name or index): once for every image, or once per image"
    p.add_argument("--class", dest="classes", action="append", default=[], help=class_help + " (default: drawn from p(y))")
    inputs = ".npy arrays, or image files of any format and size (PNG, JPEG, WebP ...)"
    for name in ("encode", "reconstruct", "score", "classify", "edit"):
        p = sub.add_parser(name)
        p.add_argument("--input", type=Path, nargs="+", required=True, help=inputs)
        p.add_argument("--out", type=Path)
        if name in ("score", "classify"):
            p.add_argument("-k", type=int, default=64)
            p.add_argument("--seed", type=int)
        if name in ("encode", "reconstruct", "score"):
            p.add_argument("--class", dest="classes", action="append", default=[], help=class_help)
        if name == "edit":
            p.add_argument("--to", dest="to_class", required=True, help="the class to move the images towards (name or index)")
            p.add_argument("--from", dest="sources", action="append", default=[],
                           help="each image's class: once for every image, or once per image (default: the model's guess)")
            p.add_argument("--strength", type=float, help="in [0, 1] (default 1)")
    p = sub.add_parser("decode")
    p.add_argument("--input", type=Path, required=True, help=".npy of latents [N, D]")
    p.add_argument("--class", dest="classes", action="append", default=[], help=class_help)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("interpolate")
    p.add_argument("--input", type=Path, nargs="+", required=True, help="two image files (or one .npy holding two)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--spherical", action="store_true")
    p.add_argument("--class", dest="classes", action="append", default=[], help="a conditional model's class of both ends, or once per end")
    p.add_argument("--out", type=Path)
    return parser


def _say_classes(client: VaeClient) -> None:
    """A conditional model's classes of the answer, on stderr (stdout may be the answer's JSON)."""
    if client.classes:
        print(f"classes: {', '.join(client.classes)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    connection = dict(ca=args.ca, cert=args.cert, key=args.key, token=args.token, model=args.model, version=args.version)
    with VaeClient(args.target, args.timeout, **connection) as client:
        try:
            if args.command == "info":
                print(json.dumps(plain(client.info()), indent=2))
            elif args.command in ("models", "load", "unload"):
                if args.command == "models":
                    listing = client.models()
                else:
                    listing = getattr(client, args.command)(args.name, args.only_version)
                for m in listing.models:
                    state = pb.ModelState.Name(m.state).removeprefix("MODEL_STATE_")
                    default = " (default)" if m.name == listing.default_model else ""
                    print(f"{m.name}{default}\tv{m.version}\t{state}\t{m.reason}".rstrip())
            elif args.command == "sample":
                _save(client.sample(args.n, args.seed, args.temperature, temperatures=args.temperatures, classes=args.classes), args.out)
            elif args.command == "encode":
                mu, sigma, _ = client.encode(load_inputs(args.input), classes=args.classes)
                if args.out:
                    np.savez(args.out, mu=mu, sigma=sigma)
                print(json.dumps({"mu": mu.round(4).tolist(), "sigma": sigma.round(4).tolist()}))
            elif args.command == "decode":
                _save(client.decode(np.load(args.input).astype(np.float32), classes=args.classes), args.out)
            elif args.command == "reconstruct":
                _save(client.reconstruct(load_inputs(args.input), classes=args.classes), args.out)
            elif args.command == "interpolate":
                x = load_inputs(args.input)
                if len(x) != 2:
                    parser.error(f"interpolate needs exactly two images, got {len(x)}")
                images, _ = client.interpolate(x[0], x[1], args.steps, args.spherical, classes=args.classes)
                _save(images, args.out)
            elif args.command == "score":
                scores = client.score(load_inputs(args.input), args.k, args.seed, classes=args.classes)
                print(json.dumps({k: v.round(3).tolist() for k, v in scores.items()}))
            elif args.command == "classify":
                names, p = client.classify(load_inputs(args.input), args.k, args.seed)
                print(json.dumps({"classes": names, "probabilities": p.round(4).tolist(), "most_probable": client.classes}))
            elif args.command == "edit":
                _save(client.edit(load_inputs(args.input), args.to_class, args.strength, args.sources), args.out)
            if args.command in ("sample", "encode", "decode", "reconstruct", "interpolate", "score", "edit"):
                _say_classes(client)
        except grpc.RpcError as err:
            print(f"{err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as err:  # an unreadable --input
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
