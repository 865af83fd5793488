"""Wire contracts: the gRPC messages generated from proto/e3/v1/e3.proto.

The generated modules are committed (so a fresh clone imports them without a
build step); `python -m e3.contracts.build` regenerates them, and
tests/deploy/test_images.py fails when they drift from the .proto file.
Import them as
`from e3.contracts import e3_pb2 as pb, e3_pb2_grpc as pb_grpc`.
"""
