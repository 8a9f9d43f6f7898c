"""Keys, certificates and key files; built on the `cryptography` package only."""

from fedpipe.crypto.certs import (
    CertPaths,
    create_ca,
    create_server_cert,
    write_certs,
    write_private,
)
from fedpipe.crypto.files import read_private_pem, write_private_bytes
from fedpipe.crypto.nodekeys import write_node_key

__all__ = [
    "CertPaths",
    "create_ca",
    "create_server_cert",
    "read_private_pem",
    "write_certs",
    "write_node_key",
    "write_private",
    "write_private_bytes",
]
