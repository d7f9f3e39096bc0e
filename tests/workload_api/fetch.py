"""A SPIFFE Workload API client, as a workload would run it: py-spiffe (`pip install spiffe`)
fetches an X509-SVID and the bundles from the socket given as argv[1]; raw gRPC calls check the
status codes. Prints one JSON object. Used by tests/workload_api.rs."""

import json
import os
import sys

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient

sock = sys.argv[1]
out = {"exe": os.path.realpath(sys.executable), "uid": os.getuid()}

try:
    with WorkloadApiClient(socket_path="unix://" + sock) as client:
        svid = client.fetch_x509_svid(timeout=10)
        out["spiffe_id"] = str(svid.spiffe_id)
        out["cert_pem"] = "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in svid.cert_chain
        )
        out["key_is_p256"] = isinstance(svid.private_key, ec.EllipticCurvePrivateKey) and (
            svid.private_key.curve.name == "secp256r1"
        )
        out["key_matches_leaf"] = svid.private_key.public_key() == svid.leaf.public_key()
        bundles = client.fetch_x509_bundles(timeout=10)
        out["bundle_trust_domains"] = sorted(b.trust_domain.name for b in bundles.bundles)
except Exception as e:  # the test reads the error text
    out["error"] = f"{type(e).__name__}: {e}"

channel = grpc.insecure_channel("unix:" + sock)
identity = lambda x: x  # noqa: E731 (raw bytes in and out)
for name, method, metadata in [
    ("no_header", "/SpiffeWorkloadAPI/FetchX509SVID", []),
    ("svid", "/SpiffeWorkloadAPI/FetchX509SVID", [("workload.spiffe.io", "true")]),
    ("bundles", "/SpiffeWorkloadAPI/FetchX509Bundles", [("workload.spiffe.io", "true")]),
]:
    call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
    try:
        stream = call(b"", timeout=10, metadata=metadata)
        first = next(stream)
        out[name] = "OK"
        if name == "svid" and len(sys.argv) > 2:
            # Wait for the next message of the stream (a rotation) and say whether it differs.
            second = next(stream)
            out["rotated"] = second != first
        stream.cancel()
    except grpc.RpcError as e:
        out[name] = f"{e.code().name}: {e.details()}"
print(json.dumps(out))
